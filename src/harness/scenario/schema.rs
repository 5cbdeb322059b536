//! The schema of a scenario file: the types it deserialises into (every section with
//! its defaults, `expect` and `expect_on`), and [`Case`], one expanded matrix point.
//! A key a file leaves out takes its default: in a section marked `#[serde(default)]`
//! the value of the section's `Default`, elsewhere `None` for an `Option` field and the
//! field's own `#[serde(default ..)]` for the others.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{portable, slash};
use crate::engine::diagnosis::{Attention, DiagnosisClass, TensorKind};
use crate::engine::model::Family;
use crate::engine::prefix::{HeadDimFrom, HeadsFrom, PrefixInit, PrefixLayout};

/// The model of a scenario: a family's tiny seeded config, a local Hugging Face
/// folder, or a Hub repository in the local cache.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `gpt2`, `llama`, `bloom`, `gpt_bigcode` or `t5`: the family's tiny config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Overrides of the tiny config, Hugging Face field names (e.g. `n_layer: 3`).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub config: serde_json::Map<String, Value>,
    /// Seed of the portable weight initialisation.
    pub seed: u64,
    /// A Hugging Face folder (`config.json`, `model.safetensors`, optional
    /// `tokenizer.json`), relative to the scenario file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A Hub repository id resolved from the local Hugging Face cache only
    /// (`HF_HUB_CACHE`, `HF_HOME`; nothing is downloaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

impl ModelSpec {
    /// A checkpoint source, when the model is not a tiny seeded one.
    pub fn source(
        &self,
        dir: &Path,
    ) -> Option<crate::engine::diagnosis::Result<crate::io::hub::ModelSource>> {
        if let Some(p) = &self.path {
            return Some(Ok(crate::io::hub::ModelSource::path(dir.join(portable(p)))));
        }
        self.hub
            .as_ref()
            .map(|id| crate::io::hub::ModelSource::hub(id, self.revision.as_deref()))
    }

    /// A short name for tables and reports.
    pub fn describe(&self) -> String {
        match (&self.family, &self.path, &self.hub) {
            (Some(f), _, _) => f.name().to_string(),
            (_, Some(p), _) => slash(p),
            (_, _, Some(h)) => format!("{h}@{}", self.revision.as_deref().unwrap_or("main")),
            _ => "?".into(),
        }
    }
}

/// The prefix of a scenario (PEFT `PrefixTuningConfig` plus historical switches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSpec {
    /// P, the number of virtual tokens (taken from the adapter when `adapter` is set).
    #[serde(default)]
    pub virtual_tokens: usize,
    /// A PEFT PREFIX_TUNING adapter folder (`adapter_config.json` +
    /// `adapter_model.safetensors`), relative to the scenario file.
    pub adapter: Option<PathBuf>,
    #[serde(default)]
    pub projection: bool,
    #[serde(default = "default_encoder_hidden")]
    pub encoder_hidden_size: usize,
    #[serde(default)]
    pub init: PrefixInit,
    #[serde(default)]
    pub layout: PrefixLayout,
    #[serde(default)]
    pub heads_from: HeadsFrom,
    #[serde(default)]
    pub head_dim_from: HeadDimFrom,
    /// The dtype the prefix enters the cache with: `model` (the fix), or `f16`,
    /// `bf16`, `f64` (historical bug, PEFT PR 520).
    #[serde(default)]
    pub dtype: crate::engine::prefix::PrefixDtype,
    /// Prepend P visible columns to the attention mask (`false`: historical bug).
    #[serde(default = "yes")]
    pub extend_mask: bool,
    /// Encoder-decoders: `inject` the cross-attention part of the prefix (default) or
    /// `drop` it, as PEFT 0.21.2 with transformers 5.x does.
    #[serde(default)]
    pub cross: crate::engine::prefix::CrossPrefix,
    #[serde(default = "default_prefix_seed")]
    pub seed: u64,
}

fn default_encoder_hidden() -> usize {
    32
}
fn default_prefix_seed() -> u64 {
    1
}
fn yes() -> bool {
    true
}

/// Cache mode names as written in scenario files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheModeName {
    None,
    #[default]
    Dynamic,
    Static,
    Sliding,
    Rotating,
    Legacy,
    Quantized,
    Hybrid,
}

impl CacheModeName {
    /// The name as written in scenario files.
    pub fn name(&self) -> &'static str {
        match self {
            CacheModeName::None => "none",
            CacheModeName::Dynamic => "dynamic",
            CacheModeName::Static => "static",
            CacheModeName::Sliding => "sliding",
            CacheModeName::Rotating => "rotating",
            CacheModeName::Legacy => "legacy",
            CacheModeName::Quantized => "quantized",
            CacheModeName::Hybrid => "hybrid",
        }
    }
}

/// The cache of a scenario.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSpec {
    pub mode: CacheModeName,
    /// `static`: capacity in positions (default: P + prompt + max_new_tokens);
    /// `hybrid`: the capacity of static global layers (absent: dynamic ones).
    pub max_len: Option<usize>,
    /// Historical (PEFT's HybridCache before `max_cache_len` counted
    /// `num_virtual_tokens`): `static` and `hybrid` caches sized for prompt + new
    /// tokens without the P prefix positions (`hybrid`: static global layers).
    pub capacity_without_prefix: bool,
    /// `sliding` and `rotating`: window in positions (required).
    pub window: Option<usize>,
    /// Historical transformers behaviour: a prefix in the T5 cross cache marks it
    /// "already computed" (before transformers PR 34312).
    pub cross_prefix_marks_updated: bool,
    /// After this generation step (0: the prefill) the cache is written to a
    /// safetensors file, read back into a fresh cache, and generation goes on; the
    /// tokens must equal the uninterrupted run's.
    pub save_at: Option<usize>,
    /// Historical (llama.cpp issue 25295): a restored `rotating` cache loses its ring
    /// head.
    pub ring_head_lost_on_load: bool,
    /// `quantized`: bits per code, 8 or 4 (default 8).
    pub bits: Option<u8>,
    /// `quantized`: the last R positions kept in full precision, at least 1 (default
    /// 4).
    pub residual: Option<usize>,
    /// `quantized`: keep the prefix in full precision for good instead of quantizing
    /// it like any other position.
    pub prefix_full_precision: bool,
}

/// Padding side of batched prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaddingSide {
    #[default]
    Left,
}

/// The data of a scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// Inline prompts; default: the built-in sentiment sentences.
    pub prompts: Vec<String>,
    /// A text file next to the scenario, one prompt per line (instead of `prompts`).
    pub file: Option<PathBuf>,
    /// Rows per batch, taken cyclically from the prompts.
    pub batch_size: usize,
    /// Prompts are cut to this many tokens.
    pub max_prompt_len: usize,
    pub padding_side: PaddingSide,
}

/// The values of the keys a scenario file leaves out.
impl Default for DataSpec {
    fn default() -> Self {
        Self {
            prompts: vec![],
            file: None,
            batch_size: 1,
            max_prompt_len: 16,
            padding_side: PaddingSide::Left,
        }
    }
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSpec {
    /// `greedy`, `{sample: {temperature, top_k, top_p, seed}}` or
    /// `{beam: {num_beams, length_penalty, early_stopping}}`.
    pub strategy: crate::engine::generate::Strategy,
    pub max_new_tokens: usize,
    /// A row that emits this id stops (later positions hold `pad_token_id`).
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Output rows per input row (beams: at most `num_beams`).
    pub num_return_sequences: usize,
    /// Expand the prefix to batch x beams (the fix); `false`: historical bug.
    pub expand_prefix: bool,
    /// Feed the prompt in chunks of this many tokens (default: all at once); the
    /// tokens must equal the whole prefill's.
    pub prefill_chunk: Option<usize>,
    /// How a prompt chunk's causal mask is aligned: `lower-right` (the fix),
    /// `upper-left` or `square` (historical bugs).
    pub chunk_mask: crate::engine::cache::ChunkMask,
    /// Historical (candle issue 3582): every row reads the first row's padding mask.
    pub mask_buffer_one_row: bool,
    /// Continuous batching: every row is generated alone up to this step, then the
    /// per-row caches are merged into one batch for the remaining steps; each row must
    /// generate what it generates alone.
    pub merge_rows_at: Option<usize>,
    /// Historical (mlx-lm cache merges): the merge slices every row to the first
    /// row's fill level.
    pub merge_fill_from_first_row: bool,
}

/// The values of the keys a scenario file leaves out.
impl Default for GenerateSpec {
    fn default() -> Self {
        Self {
            strategy: crate::engine::generate::Strategy::Greedy,
            max_new_tokens: 8,
            eos_token_id: None,
            pad_token_id: None,
            num_return_sequences: 1,
            expand_prefix: true,
            prefill_chunk: None,
            chunk_mask: crate::engine::cache::ChunkMask::LowerRight,
            mask_buffer_one_row: false,
            merge_rows_at: None,
            merge_fill_from_first_row: false,
        }
    }
}

impl GenerateSpec {
    /// What the engine and the real stack are asked to generate.
    pub fn request(&self) -> crate::engine::generate::Request {
        crate::engine::generate::Request {
            max_new_tokens: self.max_new_tokens,
            strategy: self.strategy.clone(),
            eos_token_id: self.eos_token_id,
            pad_token_id: self.pad_token_id,
            num_return_sequences: self.num_return_sequences,
        }
    }
}

/// Extra checks on a case's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checks {
    /// `decreases`: the last training loss is below the first.
    pub loss: Option<LossCheck>,
    /// `invariant`: every left-padded row generates what it generates alone, else a
    /// `divergence` naming the row and the step.
    pub padding: Option<PaddingCheck>,
    /// Bounds on what a `quantized` cache may change against the same case run
    /// unquantized (`cache.mode: dynamic`).
    pub quantization: Option<QuantizationCheck>,
}

/// `checks: {quantization: {min_token_agreement: 0.9, max_logit_drift: 0.5}}`: either
/// bound may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizationCheck {
    /// The fraction of generated tokens (all rows) equal to the unquantized run's
    /// must be at least this (0 to 1).
    pub min_token_agreement: Option<f64>,
    /// The largest absolute difference of any logit from the unquantized run's, over
    /// the steps both runs were fed the same tokens (up to the first step whose tokens
    /// differ), must be at most this.
    pub max_logit_drift: Option<f64>,
}

/// What left padding may do to a row's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PaddingCheck {
    Invariant,
}

/// What the training loss must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossCheck {
    Decreases,
}

/// Operating systems a scenario is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    Linux,
    Windows,
    Macos,
}

impl Platform {
    pub fn name(&self) -> &'static str {
        match self {
            Platform::Linux => "linux",
            Platform::Windows => "windows",
            Platform::Macos => "macos",
        }
    }

    pub fn current() -> Option<Platform> {
        match std::env::consts::OS {
            "linux" => Some(Platform::Linux),
            "windows" => Some(Platform::Windows),
            "macos" => Some(Platform::Macos),
            _ => None,
        }
    }
}

/// What a case must do.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// Run to the end without a diagnosis.
    #[default]
    Pass,
    /// Fail with this diagnosis (every given field must match).
    Error(ExpectedFailure),
}

/// An expected diagnosis: `{error: rank, layer: 0, attention: self, tensor: key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedFailure {
    pub error: DiagnosisClass,
    pub layer: Option<usize>,
    pub attention: Option<Attention>,
    pub tensor: Option<TensorKind>,
}

impl Expect {
    pub fn describe(&self) -> String {
        match self {
            Expect::Pass => "pass".into(),
            Expect::Error(f) => {
                let mut s = f.error.as_str().to_string();
                if let Some(l) = f.layer {
                    s += &format!(" @ layer {l}");
                }
                if let Some(a) = f.attention {
                    s += &format!(" {a}");
                }
                if let Some(t) = f.tensor {
                    s += &format!(" {t}");
                }
                s
            }
        }
    }
}

/// One scenario file, or one case of it once the matrix is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub model: ModelSpec,
    /// `builtin` (UTF-8 bytes, ids 0..=255) or a `tokenizer.json` path relative to the
    /// scenario file.
    pub tokenizer: Option<String>,
    pub prefix: PrefixSpec,
    #[serde(default)]
    pub cache: CacheSpec,
    #[serde(default)]
    pub data: DataSpec,
    /// Train the prefix before generating (AdamW on the prefix only, built-in data).
    pub train: Option<crate::engine::train::TrainConfig>,
    #[serde(default)]
    pub generate: GenerateSpec,
    /// Extra checks on the outcome.
    #[serde(default)]
    pub checks: Checks,
    /// Where the scenario is meant to run; elsewhere its cases are skipped.
    pub platforms: Option<Vec<Platform>>,
    #[serde(default, deserialize_with = "de_expect", serialize_with = "ser_expect")]
    pub expect: Expect,
    /// Per-platform expectations that replace `expect` there, e.g. a bug that
    /// reproduces only on Windows: `expect_on: {windows: {error: mask-width}}`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub expect_on: std::collections::BTreeMap<Platform, PlatformExpect>,
    /// What the Python stack does with this case (`run --against peft`), by installed
    /// versions; the first entry whose `when` holds applies, default `agree`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_stack: Vec<crate::harness::stack::StackExpectation>,
    /// Dotted field path -> list of values; expanded into cases.
    #[serde(default)]
    pub matrix: serde_json::Map<String, Value>,
}

/// An expectation in `expect_on` (same syntax as `expect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PlatformExpect(
    #[serde(deserialize_with = "de_expect", serialize_with = "ser_expect")] pub Expect,
);

/// Written as scenario files write it: `pass` or the failure mapping.
fn ser_expect<S: serde::Serializer>(e: &Expect, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Expect::Pass => s.serialize_str("pass"),
        Expect::Error(f) => f.serialize(s),
    }
}

/// `expect: pass` or `expect: {error: ...}`. The mapping is read through a JSON value so
/// that its own error (unknown key, unknown class) reaches the user.
fn de_expect<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Expect, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::String(w) if w == "pass" => Ok(Expect::Pass),
        Value::String(w) => Err(D::Error::custom(format!(
            "expected `pass` or a mapping like `{{error: rank, layer: 0, tensor: key}}`, got `{w}`"
        ))),
        v @ Value::Object(_) => serde_json::from_value(v)
            .map(Expect::Error)
            .map_err(|e| D::Error::custom(e.to_string())),
        other => Err(D::Error::custom(format!(
            "expected `pass` or a mapping like `{{error: rank, layer: 0, tensor: key}}`, got `{other}`"
        ))),
    }
}

/// One expanded case, ready to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    /// Stable id, e.g. `t5-sentiment[cache=static,P=8,B=3]`.
    pub id: String,
    /// The scenario file (as given on the command line, `/`-separated).
    pub file: String,
    /// The folder relative paths resolve against.
    #[serde(skip)]
    pub dir: PathBuf,
    pub scenario: Scenario,
}
