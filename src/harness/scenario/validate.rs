//! Validation: the semantic checks types cannot express (sizes, combinations of
//! fields, cache modes, quantization bounds), including probes of the file system:
//! adapter, tokenizer, data file and checkpoint files must exist and be readable, and
//! every token id a case feeds the model must be inside its vocabulary.

use std::path::Path;

use serde_json::Value;

use super::{model_config, portable, slash, CacheModeName, Scenario, MAX_NAME_CHARS, MAX_SIZE};
use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::diagnosis::EngineError;
use crate::engine::model::ModelConfig;

/// `cache.bits`, `cache.residual`, `cache.prefix_full_precision` and
/// `checks.quantization`: given only with `cache.mode: quantized`, and in range.
fn validate_quantization(s: &Scenario) -> Result<(), (String, String)> {
    let e = |f: &str, m: String| Err((f.to_string(), m));
    let c = &s.cache;
    let quantized = c.mode == CacheModeName::Quantized;
    let set = [
        ("cache.bits", c.bits.is_some()),
        ("cache.residual", c.residual.is_some()),
        ("cache.prefix_full_precision", c.prefix_full_precision),
        ("checks.quantization", s.checks.quantization.is_some()),
    ];
    if let (false, Some((field, _))) = (quantized, set.iter().find(|(_, set)| *set)) {
        return e(
            field,
            format!(
                "applies to `cache.mode: quantized` only; this case's cache is `{}`",
                c.mode.name()
            ),
        );
    }
    if let Some(b) = c.bits.filter(|b| ![4, 8].contains(b)) {
        return e(
            "cache.bits",
            format!("expected 8 or 4 bits per code, got {b}"),
        );
    }
    if c.residual == Some(0) {
        return e(
            "cache.residual",
            "expected at least 1 position kept in full precision (the step's own keys are always read exact; residual counts the ones kept after it)".into(),
        );
    }
    if let Some(q) = &s.checks.quantization {
        if q.min_token_agreement.is_none() && q.max_logit_drift.is_none() {
            return e(
                "checks.quantization",
                "give `min_token_agreement` and/or `max_logit_drift`".into(),
            );
        }
        if let Some(a) = q.min_token_agreement.filter(|a| !(0.0..=1.0).contains(a)) {
            return e(
                "checks.quantization.min_token_agreement",
                format!("expected a fraction from 0 to 1, got {a}"),
            );
        }
        if let Some(d) = q.max_logit_drift.filter(|d| !(d.is_finite() && *d >= 0.0)) {
            return e(
                "checks.quantization.max_logit_drift",
                format!("expected a finite bound of at least 0, got {d}"),
            );
        }
    }
    if quantized && s.generate.prefill_chunk.is_some() {
        return e(
            "generate.prefill_chunk",
            "cannot be checked with `cache.mode: quantized`: a chunk reads the earlier chunks' positions quantized where the whole prefill reads them exact, so the chunked run has no run it must equal".into(),
        );
    }
    Ok(())
}

/// Semantic checks that types cannot express. Returns `(field, message)`.
pub fn validate(s: &Scenario, dir: &Path) -> Result<(), (String, String)> {
    let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
    if s.name.trim().is_empty() {
        return e("name", "expected a non-empty name");
    }
    if s.name.chars().count() > MAX_NAME_CHARS {
        return Err((
            "name".into(),
            format!(
                "a name of {} characters is too long: expected at most {MAX_NAME_CHARS} (case ids and snapshot file names start with it)",
                s.name.chars().count()
            ),
        ));
    }
    let sizes = [
        ("prefix.virtual_tokens", s.prefix.virtual_tokens),
        ("prefix.encoder_hidden_size", s.prefix.encoder_hidden_size),
        ("data.batch_size", s.data.batch_size),
        ("data.max_prompt_len", s.data.max_prompt_len),
        ("generate.max_new_tokens", s.generate.max_new_tokens),
        (
            "generate.num_return_sequences",
            s.generate.num_return_sequences,
        ),
        ("cache.max_len", s.cache.max_len.unwrap_or(0)),
        ("cache.window", s.cache.window.unwrap_or(0)),
        ("cache.residual", s.cache.residual.unwrap_or(0)),
    ];
    if let Some((field, v)) = sizes.iter().find(|(_, v)| *v > MAX_SIZE) {
        return Err((
            field.to_string(),
            format!("{v} is too large: expected at most {MAX_SIZE}"),
        ));
    }
    if let Some((k, v)) = s
        .model
        .config
        .iter()
        .find(|(_, v)| v.as_u64().is_some_and(|n| n > MAX_SIZE as u64))
    {
        return Err((
            format!("model.config.{k}"),
            format!("{v} is too large: expected at most {MAX_SIZE}"),
        ));
    }
    if s.prefix.adapter.is_none() && s.prefix.virtual_tokens == 0 {
        return e("prefix.virtual_tokens", "expected at least 1 virtual token");
    }
    if let Some(a) = &s.prefix.adapter {
        let p = dir.join(portable(a));
        if !p.join("adapter_config.json").is_file() {
            return Err((
                "prefix.adapter".into(),
                format!(
                    "no PEFT adapter at {} (expected adapter_config.json and adapter_model.safetensors)",
                    slash(&p)
                ),
            ));
        }
    }
    match s.tokenizer.as_deref() {
        None | Some("builtin") => {}
        Some(f) => {
            let p = dir.join(portable(Path::new(f)));
            if !p.is_file() {
                return Err((
                    "tokenizer".into(),
                    format!(
                        "expected `builtin` or a tokenizer.json file; no such file: {}",
                        slash(&p)
                    ),
                ));
            }
        }
    }
    if let Some(t) = &s.train {
        t.validate()
            .map_err(|m| ("train".to_string(), m.to_string()))?;
    }
    if let Some(platforms) = &s.platforms {
        if let Some(p) = s.expect_on.keys().find(|p| !platforms.contains(p)) {
            return Err((
                format!("expect_on.{}", p.name()),
                format!(
                    "the scenario does not run on {} (see `platforms`)",
                    p.name()
                ),
            ));
        }
    }
    crate::harness::stack::validate_expectations(&s.expect_stack)?;
    if s.checks.loss.is_some() && s.train.is_none() {
        return e("checks.loss", "a loss check needs a `train` section");
    }
    if s.prefix.projection && s.prefix.encoder_hidden_size == 0 {
        return e(
            "prefix.encoder_hidden_size",
            "expected at least 1 with projection: true",
        );
    }
    if s.data.batch_size == 0 {
        return e("data.batch_size", "expected at least 1");
    }
    if s.data.max_prompt_len == 0 {
        return e("data.max_prompt_len", "expected at least 1");
    }
    if s.generate.max_new_tokens == 0 {
        return e("generate.max_new_tokens", "expected at least 1");
    }
    let probe = crate::engine::generate::DecodeOptions::for_request(
        CacheConfig::new(CacheMode::Dynamic),
        s.generate.request(),
    );
    probe
        .validate()
        .map_err(|m| ("generate".to_string(), m.to_string()))?;
    match s.cache.mode {
        CacheModeName::Sliding | CacheModeName::Rotating if s.cache.window.is_none() => {
            let mode = if s.cache.mode == CacheModeName::Sliding {
                "sliding"
            } else {
                "rotating"
            };
            return e(
                "cache.window",
                &format!("`{mode}` needs a window (positions kept)"),
            );
        }
        CacheModeName::None
        | CacheModeName::Dynamic
        | CacheModeName::Sliding
        | CacheModeName::Rotating
        | CacheModeName::Legacy
        | CacheModeName::Quantized
            if s.cache.capacity_without_prefix =>
        {
            return e(
                "cache.capacity_without_prefix",
                "applies to caches with a capacity only (`static`, `hybrid`)",
            );
        }
        CacheModeName::Hybrid if s.cache.window.is_some() => {
            return e(
                "cache.window",
                "`hybrid` takes each layer's window from the model config (`sliding_window`, `layer_types`); remove `cache.window`",
            );
        }
        _ => {}
    }
    validate_quantization(s)?;
    if s.generate.prefill_chunk == Some(0) {
        return e("generate.prefill_chunk", "expected at least 1");
    }
    if s.generate.prefill_chunk.is_some() && s.cache.mode == CacheModeName::None {
        return e(
            "generate.prefill_chunk",
            "needs a cache that keeps keys (`cache.mode: none` recomputes the whole sequence every step)",
        );
    }
    if s.checks.padding.is_some()
        && matches!(
            s.generate.strategy,
            crate::engine::generate::Strategy::Sample { .. }
        )
    {
        return e(
            "checks.padding",
            "needs greedy or beam decoding (a sampled row draws from its own random stream, which differs alone)",
        );
    }
    if let Some(at) = s.generate.merge_rows_at {
        let mut probe = crate::engine::generate::DecodeOptions::for_request(
            CacheConfig::new(match s.cache.mode {
                CacheModeName::Dynamic => CacheMode::Dynamic,
                CacheModeName::None => CacheMode::None,
                CacheModeName::Legacy => CacheMode::Legacy,
                // Only the mode's name matters here.
                CacheModeName::Static => CacheMode::Static { max_len: 0 },
                CacheModeName::Sliding => CacheMode::Sliding { window: 0 },
                CacheModeName::Rotating => CacheMode::Rotating { window: 0 },
                CacheModeName::Hybrid => CacheMode::Hybrid { max_len: None },
                CacheModeName::Quantized => CacheMode::Quantized {
                    bits: 8,
                    residual: 1,
                    prefix_full_precision: false,
                },
            }),
            s.generate.request(),
        );
        probe.save_at = s.cache.save_at;
        let enc_dec = s.model.family == Some(crate::engine::model::Family::T5);
        if let Some(why) = crate::engine::batching::unsupported(&probe, at, enc_dec) {
            return e("generate.merge_rows_at", &why);
        }
    }
    if let Some(at) = s.cache.save_at {
        if at + 1 >= s.generate.max_new_tokens {
            return e(
                "cache.save_at",
                &format!(
                    "expected a step before the last (0 to {}) so that generation goes on from the restored cache; max_new_tokens is {}",
                    s.generate.max_new_tokens.saturating_sub(2),
                    s.generate.max_new_tokens
                ),
            );
        }
    }
    if s.cache.window == Some(0) {
        return e("cache.window", "expected at least 1");
    }
    if s.cache.max_len == Some(0) {
        return e("cache.max_len", "expected at least 1");
    }
    if !s.data.prompts.is_empty() && s.data.file.is_some() {
        return e("data.file", "give either `prompts` or `file`, not both");
    }
    if let Some(f) = &s.data.file {
        let p = dir.join(portable(f));
        if !p.is_file() {
            return Err(("data.file".into(), format!("no such file: {}", slash(&p))));
        }
    }
    if s.data.prompts.iter().any(|p| p.is_empty()) {
        return e("data.prompts", "expected non-empty prompts");
    }
    let m = &s.model;
    let sources = [m.family.is_some(), m.path.is_some(), m.hub.is_some()];
    match sources.iter().filter(|x| **x).count() {
        0 => return e("model", "expected one of `family` (tiny seeded model), `path` (Hugging Face folder) or `hub` (cached Hub id)"),
        1 => {}
        _ => return e("model", "give only one of `family`, `path` and `hub`"),
    }
    if m.family.is_none() && !m.config.is_empty() {
        return e("model.config", "overrides apply to a tiny `family` model only; a checkpoint's config comes from its config.json");
    }
    if m.revision.is_some() && m.hub.is_none() {
        return e("model.revision", "a revision needs `hub`");
    }
    let mut checkpoint_tokenizer = None;
    let cfg = match m.source(dir) {
        None => {
            let cfg = model_config(m).map_err(|msg| ("model.config".to_string(), msg))?;
            cfg.validate()
                .map_err(|msg| ("model.config".to_string(), msg.to_string()))?;
            cfg
        }
        Some(src) => {
            let field = if m.path.is_some() {
                "model.path"
            } else {
                "model.hub"
            };
            let files = src
                .and_then(|src| src.resolve(&crate::io::hub::HubOptions::from_env()?))
                .map_err(|err| (field.to_string(), err.to_string()))?;
            let text = std::fs::read_to_string(&files.config).map_err(|err| {
                (
                    field.to_string(),
                    format!("{}: {err}", slash(&files.config)),
                )
            })?;
            let cfg = ModelConfig::from_hf_json(&text).map_err(|err| {
                (
                    field.to_string(),
                    format!("{err} (in {})", slash(&files.config)),
                )
            })?;
            checkpoint_tokenizer = files.tokenizer.clone();
            // Every weights file must be a complete safetensors file (header and length
            // only: a checkpoint can be gigabytes; `run` reads the tensors).
            for w in &files.weights {
                check_safetensors_file(w).map_err(|m| {
                    let m = format!(
                        "{}: not a valid safetensors file (truncated or corrupt?): {m}",
                        slash(w)
                    );
                    (field.to_string(), EngineError::Config(m).to_string())
                })?;
            }
            cfg
        }
    };
    let g = cfg.geometry();
    for (field, id) in [
        ("generate.eos_token_id", s.generate.eos_token_id),
        ("generate.pad_token_id", s.generate.pad_token_id),
    ] {
        if let Some(id) = id.filter(|id| *id as usize >= g.vocab_size) {
            return Err((
                field.to_string(),
                format!(
                    "token id {id} is outside the model's vocabulary of {}",
                    g.vocab_size
                ),
            ));
        }
    }
    check_vocabulary(s, dir, g.vocab_size, checkpoint_tokenizer.as_deref())?;
    // A PEFT adapter's files are read here (a missing or corrupt file is invalid
    // input); a mismatch with the model is the case's diagnosis when it runs, so a
    // scenario can expect it.
    if let Some(a) = &s.prefix.adapter {
        crate::io::adapter::load(&dir.join(portable(a)), &candle_core::Device::Cpu)
            .map_err(|err| ("prefix.adapter".to_string(), err.to_string()))?;
    }
    Ok(())
}

/// Every token id the case feeds the model must be inside its vocabulary: the prompts
/// through the case's tokenizer (the scenario's, else the checkpoint's, else the
/// built-in one), cut as the batch cuts them, and the training rows (byte-level ids,
/// plus the decoder's start and end ids for encoder-decoders). Otherwise the embedding
/// lookup fails deep inside a forward pass; here the error names the tokenizer, the
/// largest id and the vocabulary.
fn check_vocabulary(
    s: &Scenario,
    dir: &Path,
    vocab: usize,
    checkpoint_tokenizer: Option<&Path>,
) -> Result<(), (String, String)> {
    let tok_field = if s.tokenizer.is_some() {
        "tokenizer"
    } else {
        "model"
    };
    let tokenizer = match (s.tokenizer.as_deref(), checkpoint_tokenizer) {
        (None, Some(f)) => crate::io::tokenizer::Tokenizer::from_file(f),
        (None | Some("builtin"), _) => crate::io::tokenizer::Tokenizer::builtin(),
        (Some(f), _) => {
            crate::io::tokenizer::Tokenizer::from_file(dir.join(portable(Path::new(f))))
        }
    }
    .map_err(|e| (tok_field.to_string(), e.to_string()))?;
    let prompts = scenario_prompts(s, dir).map_err(|e| ("data.file".to_string(), e.to_string()))?;
    let mut largest: Option<(u32, String)> = None;
    for p in &prompts {
        let mut ids = tokenizer
            .encode(p)
            .map_err(|e| (tok_field.to_string(), e.to_string()))?;
        ids.truncate(s.data.max_prompt_len.max(1));
        if let Some(&max) = ids.iter().max() {
            if largest.as_ref().is_none_or(|(l, _)| max > *l) {
                largest = Some((max, p.clone()));
            }
        }
    }
    if let Some((id, prompt)) = largest.filter(|(id, _)| *id as usize >= vocab) {
        let shown: String = prompt.chars().take(40).collect();
        return Err((
            tok_field.to_string(),
            format!(
                "{} gives token id {id} (prompt \"{shown}\"), outside the model's vocabulary of {vocab} ids (vocab_size): use a tokenizer that matches the model, or a model with vocab_size above {id}",
                tokenizer.source()
            ),
        ));
    }
    if s.train.is_some() {
        // Training rows are the built-in sentences, byte-level (`data::encode_bytes`).
        let id = crate::io::data::SENTIMENT
            .iter()
            .flat_map(|(a, b)| a.bytes().chain(b.bytes()).chain(" => ".bytes()))
            .map(u32::from)
            .chain([crate::engine::train::SEQ2SEQ_EOS])
            .max()
            .unwrap_or(0);
        if id as usize >= vocab {
            return Err((
                "train".to_string(),
                format!(
                    "training feeds byte-level token ids up to {id} (the built-in sentiment data), outside the model's vocabulary of {vocab} ids (vocab_size): training needs vocab_size above {id}"
                ),
            ));
        }
    }
    Ok(())
}

/// The prompts of a scenario: inline, from its data file, or built in.
pub(super) fn scenario_prompts(s: &Scenario, dir: &Path) -> std::io::Result<Vec<String>> {
    let d = &s.data;
    if let Some(f) = &d.file {
        let text = std::fs::read_to_string(dir.join(portable(f)))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        return Ok(text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.is_empty())
            .collect());
    }
    if d.prompts.is_empty() {
        Ok(crate::io::data::default_prompts())
    } else {
        Ok(d.prompts.clone())
    }
}

/// The checks `safetensors::SafeTensors::read_metadata` makes, from the header alone:
/// the header fits, is JSON, and the tensors' data offsets cover the rest of the file
/// exactly. Messages are the safetensors crate's.
fn check_safetensors_file(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    if len < 8 || f.read_exact(&mut n).is_err() {
        return Err("header too small".into());
    }
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 {
        return Err("header too large".into());
    }
    if 8 + n > len {
        return Err("invalid header length".into());
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header =
        std::str::from_utf8(&header).map_err(|e| format!("invalid UTF-8 in header: {e}"))?;
    let meta: serde_json::Map<String, Value> =
        serde_json::from_str(header).map_err(|e| format!("invalid JSON in header: {e}"))?;
    let end = meta
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if (8 + n).checked_add(end) != Some(len) {
        return Err("incomplete metadata, file not fully covered".into());
    }
    Ok(())
}
