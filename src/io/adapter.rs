//! PEFT `PREFIX_TUNING` adapters: `adapter_config.json` + `adapter_model.safetensors`,
//! written and read exactly as PEFT (checked against PEFT 0.21.2) does.
//!
//! What PEFT writes for prefix tuning (`PeftModel.save_pretrained`):
//! - `adapter_model.safetensors`: ONE tensor, `prompt_embeddings`, shape
//!   `[P, L * 2 * token_dim]`, f32, with safetensors metadata `{"format": "pt"}`. With
//!   `prefix_projection` it is still the encoder OUTPUT (`get_prompt_embedding_to_save`
//!   runs the MLP); the embedding and MLP weights are not saved, so a projection adapter
//!   can be used but not trained further from the file.
//! - `adapter_config.json`: the `PrefixTuningConfig` fields, sorted, indented by two
//!   spaces, no final newline, `inference_mode` forced to `true`.
//!
//! PEFT's `PeftModel.from_pretrained` (inference mode) then builds a flat
//! `Embedding(P, L*2*token_dim)` whatever `prefix_projection` says and loads
//! `prompt_embeddings` into it; [`load`] does the same with
//! [`PrefixEncoder::from_prompt_embeddings`].
//!
//! Before anything runs, [`AdapterConfig::check_against`] compares the adapter with the
//! model's cache geometry and turns a mismatch into a [`Diagnosis`]: layers and
//! submodules (`shape`), key/value heads (`kv-heads`), per-head dimension (`head-dim`),
//! virtual tokens against the tensor or the position table (`seq-len`, `position`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::diagnosis::{CandleExt, Diagnosis, DiagnosisClass, EngineError, Result};
use crate::engine::model::ModelGeometry;
use crate::engine::prefix::{PeftGeometry, PrefixConfig, PrefixEncoder, PrefixInit};

/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The pickle file older PEFT versions (or `safe_serialization=False`) write instead.
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";
/// Name of the single tensor of a prefix-tuning adapter.
pub const TENSOR_NAME: &str = "prompt_embeddings";
/// `peft_type` of prefix tuning.
pub const PEFT_TYPE: &str = "PREFIX_TUNING";
/// The PEFT version whose files this module writes byte for byte (written as
/// `peft_version`, which PEFT only records).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// PEFT's `task_type` for the language-model tasks this harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskType {
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
}

impl TaskType {
    /// The task of a model: `SEQ_2_SEQ_LM` for encoder-decoders, `CAUSAL_LM` otherwise.
    pub fn for_model(model: &ModelGeometry) -> Self {
        if model.encoder_decoder {
            TaskType::Seq2SeqLm
        } else {
            TaskType::CausalLm
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
        }
    }
}

/// `adapter_config.json` of a PREFIX_TUNING adapter (PEFT's `PrefixTuningConfig`).
///
/// Field order is PEFT's (`json.dumps(..., sort_keys=True)`), so serialising with
/// [`AdapterConfig::to_json`] gives PEFT's bytes. Reading ignores unknown fields and
/// accepts `null` where PEFT would fill a value from the model config; see
/// [`AdapterConfig::geometry`]. A missing key reads as `None` (`Option` fields) or as
/// the field's default (`#[serde(default)]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub auto_mapping: Option<serde_json::Value>,
    pub base_model_name_or_path: Option<String>,
    pub encoder_hidden_size: Option<usize>,
    #[serde(default)]
    pub inference_mode: bool,
    /// `null` (random) or `"zero"`.
    pub init_weights: Option<String>,
    pub modules_to_save: Option<Vec<String>>,
    /// Heads of the prefix (the model's key/value heads since PEFT 0.12).
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_transformer_submodules: Option<usize>,
    pub num_virtual_tokens: usize,
    pub peft_type: String,
    /// Absent in files written before PEFT 0.15.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peft_version: Option<String>,
    #[serde(default)]
    pub prefix_projection: bool,
    pub revision: Option<String>,
    pub task_type: Option<String>,
    /// `num_attention_heads * head_dim`.
    pub token_dim: Option<usize>,
}

impl AdapterConfig {
    /// The configuration PEFT would save for `prefix` (inference mode, as
    /// `save_pretrained` writes it).
    pub fn for_prefix(
        prefix: &PrefixEncoder,
        base_model_name_or_path: Option<&str>,
        task_type: TaskType,
    ) -> Self {
        let g = &prefix.geometry;
        Self {
            auto_mapping: None,
            base_model_name_or_path: base_model_name_or_path.map(str::to_string),
            encoder_hidden_size: Some(prefix.config.encoder_hidden_size),
            inference_mode: true,
            init_weights: match prefix.config.init {
                PrefixInit::Zero => Some("zero".to_string()),
                PrefixInit::Random => None,
            },
            modules_to_save: None,
            num_attention_heads: Some(g.num_attention_heads),
            num_layers: Some(g.num_layers),
            num_transformer_submodules: Some(g.num_transformer_submodules),
            num_virtual_tokens: g.num_virtual_tokens,
            peft_type: PEFT_TYPE.to_string(),
            peft_version: Some(PEFT_FORMAT_VERSION.to_string()),
            prefix_projection: prefix.config.projection,
            revision: None,
            task_type: Some(task_type.as_str().to_string()),
            token_dim: Some(g.token_dim),
        }
    }

    /// PEFT's text: sorted keys, two-space indent, no final newline.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Config(format!("{CONFIG_FILE}: serialise: {e}")))
    }

    /// Parse `adapter_config.json` text; `source` names the file in errors.
    pub fn from_json(text: &str, source: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("{source}: {e}")))?;
        if cfg.peft_type != PEFT_TYPE {
            return Err(EngineError::Config(format!(
                "{source}: field `peft_type` is `{}`, expected `{PEFT_TYPE}` (only prefix-tuning adapters are supported)",
                cfg.peft_type
            )));
        }
        if let Some(t) = &cfg.task_type {
            if t != "CAUSAL_LM" && t != "SEQ_2_SEQ_LM" {
                return Err(EngineError::Config(format!(
                    "{source}: field `task_type` is `{t}`, expected `CAUSAL_LM` or `SEQ_2_SEQ_LM`"
                )));
            }
        }
        if cfg.num_virtual_tokens == 0 {
            return Err(EngineError::Config(format!(
                "{source}: field `num_virtual_tokens` must be at least 1"
            )));
        }
        for (name, v) in [
            ("num_attention_heads", cfg.num_attention_heads),
            ("num_layers", cfg.num_layers),
            ("num_transformer_submodules", cfg.num_transformer_submodules),
            ("token_dim", cfg.token_dim),
        ] {
            if v == Some(0) {
                return Err(EngineError::Config(format!(
                    "{source}: field `{name}` must be at least 1"
                )));
            }
        }
        Ok(cfg)
    }

    /// The task type, if the file names one this harness knows.
    pub fn task(&self) -> Option<TaskType> {
        match self.task_type.as_deref() {
            Some("CAUSAL_LM") => Some(TaskType::CausalLm),
            Some("SEQ_2_SEQ_LM") => Some(TaskType::Seq2SeqLm),
            _ => None,
        }
    }

    /// The prefix geometry of this adapter. Fields left `null` are filled as PEFT's
    /// `_prepare_prompt_learning_config` fills them (layers, key/value heads and
    /// `kv_heads * head_dim` from the model; 2 submodules for `SEQ_2_SEQ_LM`).
    pub fn geometry(&self, model: &ModelGeometry) -> PeftGeometry {
        let sub = self
            .num_transformer_submodules
            .unwrap_or(match self.task() {
                Some(TaskType::Seq2SeqLm) => 2,
                _ => 1,
            });
        let heads = self.num_attention_heads.unwrap_or(model.num_kv_heads);
        PeftGeometry {
            num_virtual_tokens: self.num_virtual_tokens,
            num_layers: self.num_layers.unwrap_or(model.num_layers),
            num_attention_heads: heads,
            token_dim: self.token_dim.unwrap_or(heads * model.head_dim),
            num_transformer_submodules: sub,
        }
    }

    /// The geometry the file itself states (every geometry field must be present).
    pub fn stated_geometry(&self, source: &str) -> Result<PeftGeometry> {
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| {
                EngineError::Config(format!(
                    "{source}: field `{name}` is missing or null (needed without a model to fill it)"
                ))
            })
        };
        Ok(PeftGeometry {
            num_virtual_tokens: self.num_virtual_tokens,
            num_layers: need(self.num_layers, "num_layers")?,
            num_attention_heads: need(self.num_attention_heads, "num_attention_heads")?,
            token_dim: need(self.token_dim, "token_dim")?,
            num_transformer_submodules: need(
                self.num_transformer_submodules,
                "num_transformer_submodules",
            )?,
        })
    }

    /// Compare the adapter with the model it is about to run on. Every mismatch PEFT
    /// or transformers would only discover inside the cache becomes a diagnosis here,
    /// naming the field and both values. Returns the adapter's geometry.
    pub fn check_against(&self, model: &ModelGeometry) -> Result<PeftGeometry> {
        let g = self.geometry(model);
        let (p, l) = (g.num_virtual_tokens, g.num_layers);
        let heads = g.num_attention_heads;
        let d = g.token_dim / heads.max(1);
        // PEFT's view of prompt_embeddings: [P, 2L, H, D] (what a mismatch shows).
        let view_model = [p, 2 * model.num_layers, model.num_kv_heads, model.head_dim];
        let view_adapter = [p, 2 * l, heads, d];
        let diag = |class: DiagnosisClass, msg: String, hint: &str| -> EngineError {
            Diagnosis::new(class, msg)
                .shapes(&view_model, &view_adapter)
                .hint(hint)
                .into()
        };

        let model_sub = if model.encoder_decoder { 2 } else { 1 };
        if g.num_transformer_submodules != model_sub {
            return Err(diag(
                DiagnosisClass::Shape,
                format!(
                    "adapter field `num_transformer_submodules` is {} but the model needs {model_sub} ({})",
                    g.num_transformer_submodules,
                    if model.encoder_decoder { "encoder-decoder: self + cross" } else { "decoder-only" }
                ),
                "the adapter was saved for a model of the other kind (causal LM vs seq2seq); check `task_type`",
            ));
        }
        if l != model.num_layers {
            return Err(diag(
                DiagnosisClass::Shape,
                format!(
                    "adapter field `num_layers` is {l} but the model has {} layers with a KV cache",
                    model.num_layers
                ),
                "the adapter was saved for a different model (check `base_model_name_or_path`)",
            ));
        }
        if heads != model.num_kv_heads {
            let hint = if heads == model.num_attention_heads
                && model.num_attention_heads != model.num_kv_heads
            {
                "the prefix was built with num_attention_heads instead of num_key_value_heads \
                 (PEFT < 0.12 on a GQA/MQA model, fixed by PEFT PR 1901)"
            } else {
                "the adapter was saved for a model with a different number of key/value heads"
            };
            return Err(diag(
                DiagnosisClass::KvHeads,
                format!(
                    "adapter field `num_attention_heads` is {heads} but the model has {} key/value heads",
                    model.num_kv_heads
                ),
                hint,
            ));
        }
        if !g.token_dim.is_multiple_of(heads.max(1)) {
            return Err(diag(
                DiagnosisClass::Shape,
                format!(
                    "adapter field `token_dim` {} is not a multiple of `num_attention_heads` {heads}",
                    g.token_dim
                ),
                "a corrupt or hand-edited adapter_config.json",
            ));
        }
        if d != model.head_dim {
            let over = model.hidden_size / model.num_attention_heads.max(1);
            let hint = if d == over && over != model.head_dim {
                "token_dim was computed as hidden_size / num_attention_heads * heads instead of \
                 from the config's head_dim / d_kv (PEFT < 0.18 on models with an explicit head_dim)"
            } else {
                "the adapter was saved for a model with a different head dimension"
            };
            return Err(diag(
                DiagnosisClass::HeadDim,
                format!(
                    "adapter head_dim (`token_dim` {} / `num_attention_heads` {heads}) is {d} but the model's head_dim is {}",
                    g.token_dim, model.head_dim
                ),
                hint,
            ));
        }
        if let Some(max) = model.max_positions {
            if p >= max {
                return Err(Diagnosis::new(
                    DiagnosisClass::Position,
                    format!(
                        "adapter field `num_virtual_tokens` is {p} but the model's learned position table has {max} rows"
                    ),
                )
                .shapes(&[max], &[p])
                .hint("the P virtual tokens shift real positions by P: P plus the prompt must fit in n_positions")
                .into());
            }
        }
        Ok(g)
    }
}

/// A loaded adapter: its configuration and its `prompt_embeddings`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The folder it was read from.
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// `[P, L*2*token_dim]`, f32 (converted from the file's float type).
    pub prompt_embeddings: Tensor,
}

impl Adapter {
    /// Check the configuration against `model` (see [`AdapterConfig::check_against`])
    /// and the tensor against the configuration.
    pub fn check_against(&self, model: &ModelGeometry) -> Result<PeftGeometry> {
        let g = self.config.check_against(model)?;
        self.check_tensor(&g)?;
        Ok(g)
    }

    /// `prompt_embeddings` must be `[num_virtual_tokens, num_layers * 2 * token_dim]`.
    fn check_tensor(&self, g: &PeftGeometry) -> Result<()> {
        let file = self.dir.join(WEIGHTS_FILE);
        let dims = self.prompt_embeddings.dims().to_vec();
        let expected = [g.num_virtual_tokens, g.embedding_width()];
        let wrong = |class, what: String| {
            Diagnosis::new(
                class,
                format!("{}: tensor `{TENSOR_NAME}` {what}", file.display()),
            )
            .shapes(&expected, &dims)
        };
        let other_adapter =
            "adapter_config.json and adapter_model.safetensors come from different adapters";
        if dims.len() != 2 {
            let what = format!(
                "has rank {}, expected 2 ([num_virtual_tokens, num_layers * 2 * token_dim])",
                dims.len()
            );
            return Err(wrong(DiagnosisClass::Rank, what).into());
        }
        if dims[0] != expected[0] {
            let what = format!(
                "has {} rows but `num_virtual_tokens` is {}",
                dims[0], expected[0]
            );
            return Err(wrong(DiagnosisClass::SeqLen, what)
                .hint(other_adapter)
                .into());
        }
        if dims[1] != expected[1] {
            let what = format!(
                "has width {} but `num_layers` {} * 2 * `token_dim` {} is {}",
                dims[1], g.num_layers, g.token_dim, expected[1]
            );
            return Err(wrong(DiagnosisClass::Shape, what)
                .hint(other_adapter)
                .into());
        }
        Ok(())
    }

    /// The prefix encoder for `model`, after [`Adapter::check_against`].
    pub fn prefix_encoder(&self, model: &ModelGeometry) -> Result<PrefixEncoder> {
        let g = self.check_against(model)?;
        self.encoder_for(g)
    }

    /// The prefix encoder with the geometry the file states, without comparing it with
    /// a model: for reproducing what PEFT does with a mismatched adapter (the failure
    /// then happens in the cache, where the engine diagnoses it).
    pub fn prefix_encoder_unchecked(&self) -> Result<PrefixEncoder> {
        let source = self.dir.join(CONFIG_FILE);
        let g = self.config.stated_geometry(&source.display().to_string())?;
        self.check_tensor(&g)?;
        self.encoder_for(g)
    }

    fn encoder_for(&self, g: PeftGeometry) -> Result<PrefixEncoder> {
        let mut cfg = PrefixConfig::new(g.num_virtual_tokens);
        cfg.projection = false;
        if let Some(h) = self.config.encoder_hidden_size {
            cfg.encoder_hidden_size = h;
        }
        if self.config.init_weights.as_deref() == Some("zero") {
            cfg.init = PrefixInit::Zero;
        }
        PrefixEncoder::from_prompt_embeddings(&cfg, g, &self.prompt_embeddings)
    }
}

/// Write `bytes` to `dir/name` atomically: a temporary file in the same folder, flushed,
/// then renamed over the target.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let target = dir.join(name);
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let io = |e: std::io::Error, what: &str, p: &Path| {
        EngineError::Config(format!("{}: {what}: {e}", p.display()))
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, "create", &tmp))?;
        f.write_all(bytes).map_err(|e| io(e, "write", &tmp))?;
        f.sync_all().map_err(|e| io(e, "flush", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &target).map_err(|e| io(e, "rename into place", &target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A safetensors file as PyTorch's `safetensors.torch.save_file(..., metadata={"format":
/// "pt"})` writes it: tensors sorted by name (all f32 here), header padded with spaces to
/// a multiple of 8 bytes, little-endian data. Each tensor is converted to f32.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    safetensors_bytes_with(tensors, &[("format", "pt")])
}

/// [`safetensors_bytes`] with other `__metadata__` entries (string keys and values).
/// u8 tensors (a quantized cache's codes) are written as `U8`, every other tensor as
/// f32.
pub fn safetensors_bytes_with(
    tensors: &[(String, Tensor)],
    metadata: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let mut header = format!("{{\"__metadata__\":{}", serde_json::Value::Object(meta));
    let mut data: Vec<u8> = vec![];
    for (name, t) in sorted {
        // Any shape; stored row-major as f32 (u8 as u8).
        let start = data.len();
        let stored = if t.dtype() == DType::U8 {
            let values: Vec<u8> = t
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .ctx("safetensors: read tensor")?;
            data.extend_from_slice(&values);
            "U8"
        } else {
            let values: Vec<f32> = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .ctx("safetensors: read tensor")?;
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            "F32"
        };
        let name_json = serde_json::to_string(name)
            .map_err(|e| EngineError::Config(format!("safetensors: tensor name: {e}")))?;
        let shape: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",{name_json}:{{\"dtype\":\"{stored}\",\"shape\":[{}],\"data_offsets\":[{start},{}]}}",
            shape.join(","),
            data.len()
        ));
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    Ok(out)
}

/// Write [`safetensors_bytes`] to `path` atomically (the folder must exist).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_file_atomic(path, &safetensors_bytes(tensors)?)
}

/// Write `bytes` to `path` atomically (the folder must exist).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| EngineError::Config(format!("{}: not a file path", path.display())))?;
    write_atomic(dir, name, bytes)
}

/// Save `prefix` as a PEFT PREFIX_TUNING adapter in `dir` (created if needed):
/// `adapter_model.safetensors` with `prompt_embeddings` = `prefix.forward()`
/// `[P, L*2*token_dim]`, then `adapter_config.json`. `task_type` defaults to the
/// model's kind. Returns the configuration written.
///
/// The weights are written first and the configuration last, each atomically, so a
/// folder with a configuration always has the weights it describes.
pub fn save(
    dir: &Path,
    prefix: &PrefixEncoder,
    model: &ModelGeometry,
    base_model_name_or_path: Option<&str>,
    task_type: Option<TaskType>,
) -> Result<AdapterConfig> {
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::Config(format!("{}: create folder: {e}", dir.display())))?;
    let task = task_type.unwrap_or_else(|| TaskType::for_model(model));
    let cfg = AdapterConfig::for_prefix(prefix, base_model_name_or_path, task);
    // [P, L*2*token_dim]
    let emb = prefix.forward()?;
    let g = &prefix.geometry;
    if emb.dims() != [g.num_virtual_tokens, g.embedding_width()] {
        return Err(EngineError::Config(format!(
            "prefix encoder output has shape {:?}, expected [{}, {}]",
            emb.dims(),
            g.num_virtual_tokens,
            g.embedding_width()
        )));
    }
    let bytes = safetensors_bytes(&[(TENSOR_NAME.to_string(), emb)])?;
    write_atomic(dir, WEIGHTS_FILE, &bytes)?;
    write_atomic(dir, CONFIG_FILE, cfg.to_json()?.as_bytes())?;
    Ok(cfg)
}

/// Read the adapter in `dir`: parse `adapter_config.json` (unknown fields ignored),
/// check `peft_type`, read `prompt_embeddings` `[P, L*2*token_dim]` (as f32 on `device`)
/// and check it against the configuration. Compare with a model with
/// [`Adapter::check_against`] or build the prefix with [`Adapter::prefix_encoder`].
pub fn load(dir: &Path, device: &Device) -> Result<Adapter> {
    if !dir.is_dir() {
        return Err(EngineError::Config(format!(
            "{}: adapter folder not found",
            dir.display()
        )));
    }
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| EngineError::Config(format!("{}: {e}", cfg_path.display())))?;
    let config = AdapterConfig::from_json(&text, &cfg_path.display().to_string())?;

    let w_path = dir.join(WEIGHTS_FILE);
    if !w_path.is_file() && dir.join(LEGACY_WEIGHTS_FILE).is_file() {
        return Err(EngineError::Config(format!(
            "{}: only safetensors adapters are supported, found {LEGACY_WEIGHTS_FILE} (a pickle); \
             re-save it with PEFT's `save_pretrained(..., safe_serialization=True)`",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&w_path)
        .map_err(|e| EngineError::Config(format!("{}: {e}", w_path.display())))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        EngineError::Config(format!(
            "{}: not a valid safetensors file (truncated or corrupt?): {e}",
            w_path.display()
        ))
    })?;
    let t = tensors.remove(TENSOR_NAME).ok_or_else(|| {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        EngineError::Config(format!(
            "{}: no tensor `{TENSOR_NAME}` (found: {names:?}); not a prompt-learning adapter",
            w_path.display()
        ))
    })?;
    if !t.dtype().is_float() {
        return Err(EngineError::Config(format!(
            "{}: tensor `{TENSOR_NAME}` has dtype {:?}, expected a float type",
            w_path.display(),
            t.dtype()
        )));
    }
    // [P, L*2*token_dim]
    let prompt_embeddings = t.to_dtype(DType::F32).ctx("prompt_embeddings to f32")?;
    let adapter = Adapter {
        dir: dir.to_path_buf(),
        config,
        prompt_embeddings,
    };
    // The tensor must at least agree with what the file states about itself.
    if let Ok(g) = adapter
        .config
        .stated_geometry(&cfg_path.display().to_string())
    {
        adapter.check_tensor(&g)?;
    }
    Ok(adapter)
}

/// [`load`], check against `model`, and build the prefix encoder: what
/// `prefix: {adapter: DIR}` does before anything runs.
pub fn load_for(
    dir: &Path,
    model: &ModelGeometry,
    device: &Device,
) -> Result<(AdapterConfig, PrefixEncoder)> {
    let adapter = load(dir, device)?;
    let enc = adapter.prefix_encoder(model)?;
    Ok((adapter.config, enc))
}
