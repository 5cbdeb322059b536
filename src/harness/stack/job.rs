//! The job: what the stack is fed, written from the engine's own inputs.

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::engine::generate::Request;
use crate::harness::run::Prepared;
use crate::harness::scenario::{CacheModeName, Case};

/// The job of one scenario file.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// [`super::PROTOCOL`].
    pub protocol: u32,
    pub cases: Vec<JobCase>,
}

/// One case as the driver reads it (see the driver's docstring).
#[derive(Debug, Clone, Serialize)]
pub struct JobCase {
    pub id: String,
    pub model_dir: String,
    pub adapter_dir: String,
    pub encoder_decoder: bool,
    pub cache: JobCache,
    /// `[B, S]`, left-padded: the engine's prompt batch.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B, S]`, 1 = token.
    pub attention_mask: Vec<Vec<u8>>,
    pub decoder_start_token_id: u32,
    pub generate: JobGenerate,
    pub train: Option<JobTrain>,
    pub timeout_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobCache {
    pub mode: &'static str,
    pub max_len: Option<usize>,
    pub window: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobGenerate {
    #[serde(flatten)]
    pub request: Request,
    /// The prompt in chunks of this many tokens (transformers' `prefill_chunk_size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefill_chunk: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobTrain {
    pub lr: f64,
    pub weight_decay: f64,
    pub steps: usize,
    pub batches: Vec<JobBatch>,
}

/// One training batch: `input_ids`, `attention_mask` `[B, S]` (right-padded),
/// `decoder_input_ids` `[B, T]` for encoder-decoders, `labels` `[B, T]` aligned with the
/// logits' positions (-100 = ignored).
#[derive(Debug, Clone, Serialize)]
pub struct JobBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub decoder_input_ids: Option<Vec<Vec<u32>>>,
    pub labels: Vec<Vec<i64>>,
}

/// Token ids `[B, S]` (any integer dtype) as rows of JSON numbers.
fn ids2(t: &Tensor) -> Result<Vec<Vec<u32>>, String> {
    t.to_dtype(DType::U32)
        .and_then(|t| t.to_vec2())
        .map_err(|e| format!("ids: {e}"))
}

/// A padding mask `[B, S]` (f32, 1 = token) as rows of 0 / 1.
fn mask2(t: &Tensor) -> Result<Vec<Vec<u8>>, String> {
    let m: Vec<Vec<f32>> = t
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec2())
        .map_err(|e| format!("mask: {e}"))?;
    Ok(m.iter()
        .map(|r| r.iter().map(|&x| u8::from(x > 0.5)).collect())
        .collect())
}

/// Write what `case` runs on into `dir` (a fresh folder) and describe it for the
/// driver. `prepared` is the engine's [`crate::harness::run::prepare`] of the case, untrained.
pub fn export_case(
    case: &Case,
    prepared: &Prepared,
    dir: &Path,
    timeout: Option<Duration>,
) -> Result<JobCase, String> {
    let g = prepared.model.geometry();
    let model_dir = match case.scenario.model.source(&case.dir) {
        Some(src) => {
            let files = src
                .and_then(|s| s.resolve(&crate::io::hub::HubOptions::from_env()?))
                .map_err(|e| e.to_string())?;
            files.dir
        }
        None => {
            let cfg = case.model_config()?;
            let d = dir.join("model");
            write_model(&d, &cfg, &prepared.base, &case.scenario.generate)?;
            d
        }
    };
    let adapter_dir = match case.adapter_dir() {
        Some(a) => a,
        None => {
            let d = dir.join("adapter");
            crate::io::adapter::save(&d, &prepared.prefix, &g, None, None)
                .map_err(|e| format!("write the PEFT adapter: {e}"))?;
            d
        }
    };
    let train = match &case.scenario.train {
        None => None,
        Some(cfg) => {
            let batches = crate::engine::train::step_batches(
                prepared.model.as_ref(),
                cfg,
                crate::io::data::SENTIMENT,
                &Device::Cpu,
            )
            .map_err(|e| e.to_string())?;
            let batches = batches
                .iter()
                .map(|b| {
                    Ok(JobBatch {
                        input_ids: ids2(&b.ids)?,
                        attention_mask: mask2(&b.mask)?,
                        decoder_input_ids: b.decoder.as_ref().map(|(d, _)| ids2(d)).transpose()?,
                        labels: b
                            .labels
                            .to_dtype(DType::I64)
                            .and_then(|l| l.to_vec2())
                            .map_err(|e| format!("labels: {e}"))?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Some(JobTrain {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                steps: cfg.steps,
                batches,
            })
        }
    };
    let c = &case.scenario.cache;
    let gen = &case.scenario.generate;
    Ok(JobCase {
        id: case.id.clone(),
        model_dir: model_dir.to_string_lossy().into_owned(),
        adapter_dir: adapter_dir.to_string_lossy().into_owned(),
        encoder_decoder: g.encoder_decoder,
        cache: JobCache {
            mode: mode_name(c.mode),
            max_len: match prepared.opts.cache.mode {
                crate::engine::cache::CacheMode::Static { max_len } => Some(max_len),
                _ => None,
            },
            window: c.window,
        },
        input_ids: ids2(&prepared.ids)?,
        attention_mask: mask2(&prepared.mask)?,
        decoder_start_token_id: prepared.model.decoder_start_token_id(),
        generate: JobGenerate {
            request: gen.request(),
            prefill_chunk: gen.prefill_chunk,
        },
        train,
        timeout_s: timeout.map(|t| t.as_secs_f64()).unwrap_or(0.0),
    })
}

fn mode_name(m: CacheModeName) -> &'static str {
    match m {
        CacheModeName::None => "none",
        CacheModeName::Dynamic => "dynamic",
        CacheModeName::Static => "static",
        // transformers' sliding layers; how the stack orders its slots is its own.
        CacheModeName::Sliding | CacheModeName::Rotating => "sliding",
        CacheModeName::Legacy => "legacy",
        CacheModeName::Hybrid => "hybrid",
        // Never exported: `run_against` skips quantized cases before the driver runs.
        CacheModeName::Quantized => "dynamic",
    }
}

/// A seeded model as transformers saves it: `config.json` (the family's config with
/// its `model_type` and `architectures`) and `model.safetensors` (every weight the
/// engine read, by Hugging Face name and in PyTorch's shapes). Token ids that make
/// transformers stop or pad are the scenario's (none by default), so that `generate`
/// runs as long as the engine does.
pub fn write_model(
    dir: &Path,
    cfg: &crate::engine::model::ModelConfig,
    base: &crate::engine::train::BaseWeights,
    gen: &crate::harness::scenario::GenerateSpec,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut json = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let family = cfg.family();
    let m = json
        .as_object_mut()
        .ok_or("internal: a model config is not a mapping")?;
    m.remove("family");
    m.insert("model_type".into(), family.model_type().into());
    m.insert("architectures".into(), vec![family.architecture()].into());
    m.insert("eos_token_id".into(), gen.eos_token_id.into());
    m.insert("bos_token_id".into(), serde_json::Value::Null);
    m.insert("pad_token_id".into(), gen.pad_token_id.into());
    if family == crate::engine::model::Family::T5 {
        m.insert("decoder_start_token_id".into(), 0.into());
        m.insert("pad_token_id".into(), gen.pad_token_id.unwrap_or(0).into());
        m.insert("is_encoder_decoder".into(), true.into());
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    let tensors: Vec<(String, Tensor)> = base
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    crate::io::adapter::save_safetensors(&dir.join("model.safetensors"), &tensors)
        .map_err(|e| format!("write model.safetensors: {e}"))?;
    crate::harness::report::write_atomic(&dir.join("config.json"), &text)
        .map_err(|e| format!("write config.json: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::generate::Strategy;
    use crate::harness::stack::DRIVER;

    /// The driver reads `generate`'s keys at the top of that object and fills in a
    /// default for any it does not find (driver.py's protocol docstring), so a request
    /// written one level deeper would run with the defaults, silently.
    #[test]
    fn generate_is_written_with_the_keys_the_driver_reads() {
        let request = Request {
            max_new_tokens: 5,
            strategy: Strategy::Beam {
                num_beams: 2,
                length_penalty: 1.0,
                early_stopping: true,
            },
            eos_token_id: Some(2),
            pad_token_id: Some(0),
            num_return_sequences: 2,
        };
        let g = JobGenerate {
            request,
            prefill_chunk: Some(3),
        };
        let expected = serde_json::json!({
            "max_new_tokens": 5,
            "strategy": {"beam": {"num_beams": 2, "length_penalty": 1.0, "early_stopping": true}},
            "eos_token_id": 2,
            "pad_token_id": 0,
            "num_return_sequences": 2,
            "prefill_chunk": 3,
        });
        assert_eq!(serde_json::to_value(&g).unwrap(), expected);
        // Each key is one the driver's protocol names.
        for key in expected.as_object().unwrap().keys() {
            assert!(DRIVER.contains(&format!("\"{key}\"")), "{key}");
        }
    }
}
