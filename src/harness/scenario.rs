//! Scenario files: parse (YAML, with line and column in every error), validate, and
//! expand a `matrix` into cases with stable, readable ids.
//!
//! A scenario file describes one experiment; `matrix` maps dotted field paths to lists
//! of values, and the cases are their cartesian product (first key varies slowest).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::diagnosis::{Attention, DiagnosisClass, EngineError, TensorKind};
use crate::engine::model::{Family, ModelConfig};
use crate::engine::prefix::{HeadDimFrom, HeadsFrom, PrefixConfig, PrefixInit, PrefixLayout};

/// Largest number of cases one file may expand to.
pub const MAX_CASES_PER_FILE: usize = 4096;
/// Largest value accepted for any size in a scenario (tokens, rows, window, ...):
/// far above anything a CPU run can hold; the memory guard refuses big cases.
pub const MAX_SIZE: usize = 1 << 24;
/// Longest scenario `name`, in characters: case ids, snapshot file names and report
/// rows start with it.
pub const MAX_NAME_CHARS: usize = 100;
/// Largest scenario file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most YAML nodes one scenario file may hold, aliases counted expanded (the shipped
/// 150-case grid has about 60): a billion-laughs file is refused after this many.
pub const MAX_YAML_NODES: usize = 20_000;
/// Deepest YAML nesting accepted (real scenarios nest 4 levels).
pub const MAX_YAML_DEPTH: usize = 32;

/// A problem with a scenario file: which file, where, which field, what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the field, e.g. `prefix.virtual_tokens` (empty when unknown).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}

/// The model of a scenario: a family's tiny seeded config, a local Hugging Face
/// folder, or a Hub repository in the local cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `gpt2`, `llama`, `bloom`, `gpt_bigcode` or `t5`: the family's tiny config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// Overrides of the tiny config, Hugging Face field names (e.g. `n_layer: 3`).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub config: serde_json::Map<String, Value>,
    /// Seed of the portable weight initialisation.
    #[serde(default)]
    pub seed: u64,
    /// A Hugging Face folder (`config.json`, `model.safetensors`, optional
    /// `tokenizer.json`), relative to the scenario file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A Hub repository id resolved from the local Hugging Face cache only
    /// (`HF_HUB_CACHE`, `HF_HOME`; nothing is downloaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default)]
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
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    #[serde(default)]
    pub mode: CacheModeName,
    /// `static`: capacity in positions (default: P + prompt + max_new_tokens);
    /// `hybrid`: the capacity of static global layers (absent: dynamic ones).
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Historical (PEFT's HybridCache before `max_cache_len` counted
    /// `num_virtual_tokens`): `static` and `hybrid` caches sized for prompt + new
    /// tokens without the P prefix positions (`hybrid`: static global layers).
    #[serde(default)]
    pub capacity_without_prefix: bool,
    /// `sliding` and `rotating`: window in positions (required).
    #[serde(default)]
    pub window: Option<usize>,
    /// Historical transformers behaviour: a prefix in the T5 cross cache marks it
    /// "already computed" (before transformers PR 34312).
    #[serde(default)]
    pub cross_prefix_marks_updated: bool,
    /// After this generation step (0: the prefill) the cache is written to a
    /// safetensors file, read back into a fresh cache, and generation goes on; the
    /// tokens must equal the uninterrupted run's.
    #[serde(default)]
    pub save_at: Option<usize>,
    /// Historical (llama.cpp issue 25295): a restored `rotating` cache loses its ring
    /// head.
    #[serde(default)]
    pub ring_head_lost_on_load: bool,
    /// `quantized`: bits per code, 8 or 4 (default 8).
    #[serde(default)]
    pub bits: Option<u8>,
    /// `quantized`: the last R positions kept in full precision, at least 1 (default
    /// 4).
    #[serde(default)]
    pub residual: Option<usize>,
    /// `quantized`: keep the prefix in full precision for good instead of quantizing
    /// it like any other position.
    #[serde(default)]
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
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Inline prompts; default: the built-in sentiment sentences.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// A text file next to the scenario, one prompt per line (instead of `prompts`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Rows per batch, taken cyclically from the prompts.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Prompts are cut to this many tokens.
    #[serde(default = "default_prompt_len")]
    pub max_prompt_len: usize,
    #[serde(default)]
    pub padding_side: PaddingSide,
}

fn default_batch() -> usize {
    1
}
fn default_prompt_len() -> usize {
    16
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            prompts: vec![],
            file: None,
            batch_size: default_batch(),
            max_prompt_len: default_prompt_len(),
            padding_side: PaddingSide::Left,
        }
    }
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    /// `greedy`, `{sample: {temperature, top_k, top_p, seed}}` or
    /// `{beam: {num_beams, length_penalty, early_stopping}}`.
    #[serde(default)]
    pub strategy: crate::engine::generate::Strategy,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// A row that emits this id stops (later positions hold `pad_token_id`).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Output rows per input row (beams: at most `num_beams`).
    #[serde(default = "default_return")]
    pub num_return_sequences: usize,
    /// Expand the prefix to batch x beams (the fix); `false`: historical bug.
    #[serde(default = "yes")]
    pub expand_prefix: bool,
    /// Feed the prompt in chunks of this many tokens (default: all at once); the
    /// tokens must equal the whole prefill's.
    #[serde(default)]
    pub prefill_chunk: Option<usize>,
    /// How a prompt chunk's causal mask is aligned: `lower-right` (the fix),
    /// `upper-left` or `square` (historical bugs).
    #[serde(default)]
    pub chunk_mask: crate::engine::cache::ChunkMask,
    /// Historical (candle issue 3582): every row reads the first row's padding mask.
    #[serde(default)]
    pub mask_buffer_one_row: bool,
    /// Continuous batching: every row is generated alone up to this step, then the
    /// per-row caches are merged into one batch for the remaining steps; each row must
    /// generate what it generates alone.
    #[serde(default)]
    pub merge_rows_at: Option<usize>,
    /// Historical (mlx-lm cache merges): the merge slices every row to the first
    /// row's fill level.
    #[serde(default)]
    pub merge_fill_from_first_row: bool,
}

fn default_new_tokens() -> usize {
    8
}
fn default_return() -> usize {
    1
}

impl Default for GenerateSpec {
    fn default() -> Self {
        Self {
            strategy: crate::engine::generate::Strategy::Greedy,
            max_new_tokens: default_new_tokens(),
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

/// Extra checks on a case's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    /// `decreases`: the last training loss is below the first.
    #[serde(default)]
    pub loss: Option<LossCheck>,
    /// `invariant`: every left-padded row generates what it generates alone, else a
    /// `divergence` naming the row and the step.
    #[serde(default)]
    pub padding: Option<PaddingCheck>,
    /// Bounds on what a `quantized` cache may change against the same case run
    /// unquantized (`cache.mode: dynamic`).
    #[serde(default)]
    pub quantization: Option<QuantizationCheck>,
}

/// `checks: {quantization: {min_token_agreement: 0.9, max_logit_drift: 0.5}}`: either
/// bound may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationCheck {
    /// The fraction of generated tokens (all rows) equal to the unquantized run's
    /// must be at least this (0 to 1).
    #[serde(default)]
    pub min_token_agreement: Option<f64>,
    /// The largest absolute difference of any logit from the unquantized run's, over
    /// the steps both runs were fed the same tokens (up to the first step whose tokens
    /// differ), must be at most this.
    #[serde(default)]
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
    #[serde(default)]
    pub layer: Option<usize>,
    #[serde(default)]
    pub attention: Option<Attention>,
    #[serde(default)]
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
    #[serde(default)]
    pub tokenizer: Option<String>,
    pub prefix: PrefixSpec,
    #[serde(default)]
    pub cache: CacheSpec,
    #[serde(default)]
    pub data: DataSpec,
    /// Train the prefix before generating (AdamW on the prefix only, built-in data).
    #[serde(default)]
    pub train: Option<crate::engine::train::TrainConfig>,
    #[serde(default)]
    pub generate: GenerateSpec,
    /// Extra checks on the outcome.
    #[serde(default)]
    pub checks: Checks,
    /// Where the scenario is meant to run; elsewhere its cases are skipped.
    #[serde(default)]
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

/// Short names of common matrix keys in case ids.
fn short_key(path: &str) -> String {
    match path {
        "cache.mode" => "cache".into(),
        "prefix.virtual_tokens" => "P".into(),
        "data.batch_size" => "B".into(),
        "model.family" => "family".into(),
        "generate.max_new_tokens" => "new".into(),
        other => other.rsplit('.').next().unwrap_or(other).to_string(),
    }
}

/// How a matrix value appears in a case id: scalars as written, mappings as their
/// values joined by `/` (`{mode: sliding, window: 16}` -> `sliding/16`).
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => m.values().map(value_text).collect::<Vec<_>>().join("/"),
        Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// How scenario files are loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Let relative paths (`data.file`, `prefix.adapter`, `tokenizer`) point outside the
    /// scenario's folder (`--allow-outside-paths`). Off by default: bug-report files
    /// come from strangers.
    pub allow_outside_paths: bool,
}

/// Read, parse and expand one scenario file.
pub fn load(path: &Path) -> Result<Vec<Case>, InputError> {
    load_with(path, LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Vec<Case>, InputError> {
    let err = |field: &str, message: String| InputError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: field.to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err("", format!("cannot read the file: {e}")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(err(
            "",
            format!(
                "the file has {} bytes; scenario files are limited to {MAX_FILE_BYTES}",
                bytes.len()
            ),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| err("", format!("not UTF-8 text: {e}")))?;
    parse_with(path, &text, opts)
}

/// The parser's input budgets for scenario files (bug reports come from strangers).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = 4 * MAX_YAML_NODES;
    budget.max_depth = MAX_YAML_DEPTH;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_YAML_NODES;
    options
}

/// Parse and expand scenario text (`path` is used in errors and to resolve files).
pub fn parse(path: &Path, text: &str) -> Result<Vec<Case>, InputError> {
    parse_with(path, text, LoadOptions::default())
}

/// [`parse`] with options.
pub fn parse_with(path: &Path, text: &str, opts: LoadOptions) -> Result<Vec<Case>, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Typed parse first: unknown keys, wrong types and negative sizes get a line and column.
    if text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    }) {
        return Err(InputError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            field: String::new(),
            message: "the file holds no YAML document; a scenario needs at least `name`, `model` and `prefix`".into(),
        });
    }
    let base: Scenario = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(path, text, &e))?;
    let doc: Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(path, text, &e))?;
    let mut doc = doc;
    if let Value::Object(m) = &mut doc {
        m.remove("matrix");
    }
    let err = |field: &str, message: String| InputError {
        file: path.to_path_buf(),
        line: locate(text, field),
        column: None,
        field: field.to_string(),
        message,
    };
    // The matrix: every key a known field path, every value a non-empty list.
    let mut axes: Vec<(String, Vec<Value>)> = vec![];
    for (key, values) in &base.matrix {
        let field = format!("matrix.{key}");
        let Value::Array(list) = values else {
            return Err(err(&field, "expected a list of values".into()));
        };
        if list.is_empty() {
            return Err(err(&field, "expected at least one value".into()));
        }
        check_matrix_path(&doc, key).map_err(|m| err(&field, m))?;
        axes.push((key.clone(), list.clone()));
    }
    // Saturating: a matrix of many long axes must be refused, not overflow.
    let total: usize = axes
        .iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
        .unwrap_or(usize::MAX);
    if total > MAX_CASES_PER_FILE {
        return Err(err(
            "matrix",
            if total == usize::MAX {
                format!("the matrix expands to more than {} cases; at most {MAX_CASES_PER_FILE} are allowed per file", usize::MAX)
            } else {
                format!("the matrix expands to {total} cases; at most {MAX_CASES_PER_FILE} are allowed per file")
            },
        ));
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path.to_string_lossy().replace('\\', "/");
    let mut cases = Vec::with_capacity(total);
    for n in 0..total {
        // Odometer: the first axis varies slowest.
        let mut rem = n;
        let mut picks = vec![0; axes.len()];
        for (i, (_, vals)) in axes.iter().enumerate().rev() {
            picks[i] = rem % vals.len();
            rem /= vals.len();
        }
        let mut case_doc = doc.clone();
        let mut labels = vec![];
        for ((key, vals), pick) in axes.iter().zip(&picks) {
            set_path(&mut case_doc, key, vals[*pick].clone());
            labels.push(format!("{}={}", short_key(key), value_text(&vals[*pick])));
        }
        let scenario: Scenario = serde_json::from_value(case_doc).map_err(|e| {
            let key = axes
                .iter()
                .zip(&picks)
                .map(|((k, v), p)| format!("{k}={}", value_text(&v[*p])))
                .collect::<Vec<_>>()
                .join(", ");
            err(
                "matrix",
                format!("the case [{key}] is not a valid scenario: {e}"),
            )
        })?;
        let mut scenario = scenario;
        normalise_paths(&mut scenario);
        // Confinement first: validation probes the files a scenario names, and its
        // messages must never describe a folder the scenario may not reach.
        if !opts.allow_outside_paths {
            check_paths_inside(&scenario, &dir).map_err(|(field, m)| err(&field, m))?;
        }
        validate(&scenario, &dir).map_err(|(field, m)| {
            // A field a matrix axis sets (or lies inside, or contains): blame the axis
            // and name the case, not the base value the matrix replaced.
            let axis = axes.iter().map(|(k, _)| k).find(|k| {
                field == **k
                    || field.starts_with(&format!("{k}."))
                    || k.starts_with(&format!("{field}."))
            });
            match axis {
                Some(k) => err(
                    &format!("matrix.{k}"),
                    format!("the case [{}]: {m}", labels.join(",")),
                ),
                None => err(&field, m),
            }
        })?;
        let id = if labels.is_empty() {
            scenario.name.clone()
        } else {
            format!("{}[{}]", scenario.name, labels.join(","))
        };
        cases.push(Case {
            id,
            file: file.clone(),
            dir: dir.clone(),
            scenario,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for c in &cases {
        if !seen.insert(c.id.clone()) {
            return Err(err("matrix", format!("two cases share the id `{}`", c.id)));
        }
    }
    Ok(cases)
}

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
    let mut probe =
        crate::engine::generate::DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 1);
    probe.strategy = s.generate.strategy.clone();
    probe.num_return_sequences = s.generate.num_return_sequences;
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
        let mut probe = crate::engine::generate::DecodeOptions::new(
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
            s.generate.max_new_tokens,
        );
        probe.strategy = s.generate.strategy.clone();
        probe.eos_token_id = s.generate.eos_token_id;
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
fn scenario_prompts(s: &Scenario, dir: &Path) -> std::io::Result<Vec<String>> {
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

/// The model config of a spec: the family's tiny config with the overrides applied.
/// (Checkpoint models read theirs from `config.json`: see [`Case::model_config`].)
pub fn model_config(spec: &ModelSpec) -> Result<ModelConfig, String> {
    let Some(family) = spec.family else {
        return Err("a checkpoint model's config comes from its config.json".into());
    };
    let tiny = ModelConfig::tiny(family);
    let mut v = serde_json::to_value(&tiny).map_err(|e| e.to_string())?;
    let Value::Object(m) = &mut v else {
        return Err("internal: config is not a mapping".into());
    };
    for (k, val) in &spec.config {
        if k == "family" || !m.contains_key(k) {
            let known: Vec<&str> = m
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "family")
                .collect();
            let hint = suggest(k, &known)
                .map(|s| format!(", did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(format!(
                "unknown {} config field `{k}`{hint} (fields: {})",
                family.name(),
                known.join(", ")
            ));
        }
        m.insert(k.clone(), val.clone());
    }
    serde_json::from_value(v).map_err(|e| format!("{}: {e}", family.name()))
}

impl Case {
    /// The model's config: the tiny family config with overrides, or the checkpoint's
    /// `config.json`.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        match self.scenario.model.source(&self.dir) {
            None => model_config(&self.scenario.model),
            Some(src) => {
                let files = src
                    .and_then(|s| s.resolve(&crate::io::hub::HubOptions::from_env()?))
                    .map_err(|e| e.to_string())?;
                let text = std::fs::read_to_string(&files.config)
                    .map_err(|e| format!("{}: {e}", slash(&files.config)))?;
                ModelConfig::from_hf_json(&text)
                    .map_err(|e| format!("{e} (in {})", slash(&files.config)))
            }
        }
    }

    pub fn prefix_config(&self) -> PrefixConfig {
        let p = &self.scenario.prefix;
        PrefixConfig {
            num_virtual_tokens: p.virtual_tokens,
            projection: p.projection,
            encoder_hidden_size: p.encoder_hidden_size,
            init: p.init,
            layout: p.layout,
            heads_from: p.heads_from,
            head_dim_from: p.head_dim_from,
            dtype: p.dtype,
            cross: p.cross,
            seed: p.seed,
        }
    }

    /// The cache config; `prompt_len` is the batch's prompt length and `p` the number
    /// of virtual tokens (from the adapter when there is one): together they size a
    /// static cache by default.
    pub fn cache_config(&self, prompt_len: usize, p: usize) -> CacheConfig {
        let c = &self.scenario.cache;
        let new = self.scenario.generate.max_new_tokens;
        let capacity = prompt_len + new + if c.capacity_without_prefix { 0 } else { p };
        let mode = match c.mode {
            CacheModeName::None => CacheMode::None,
            CacheModeName::Dynamic => CacheMode::Dynamic,
            CacheModeName::Static => CacheMode::Static {
                max_len: c.max_len.unwrap_or(capacity),
            },
            CacheModeName::Sliding => CacheMode::Sliding {
                window: c.window.unwrap_or(usize::MAX),
            },
            CacheModeName::Rotating => CacheMode::Rotating {
                window: c.window.unwrap_or(usize::MAX),
            },
            CacheModeName::Legacy => CacheMode::Legacy,
            CacheModeName::Hybrid => CacheMode::Hybrid {
                max_len: c.max_len.or(c.capacity_without_prefix.then_some(capacity)),
            },
            CacheModeName::Quantized => CacheMode::Quantized {
                bits: c.bits.unwrap_or(crate::engine::cache::quant::DEFAULT_BITS),
                residual: c
                    .residual
                    .unwrap_or(crate::engine::cache::quant::DEFAULT_RESIDUAL),
                prefix_full_precision: c.prefix_full_precision,
            },
        };
        let mut cfg = CacheConfig::new(mode);
        if c.window.is_some() {
            cfg.window = c.window;
        }
        cfg.cross_prefix_marks_updated = c.cross_prefix_marks_updated;
        cfg.ring_head_lost_on_load = c.ring_head_lost_on_load;
        cfg.chunk_mask = self.scenario.generate.chunk_mask;
        cfg
    }

    /// The prompts of the case: inline, from the data file, or built in.
    pub fn prompts(&self) -> std::io::Result<Vec<String>> {
        scenario_prompts(&self.scenario, &self.dir)
    }

    /// The tokenizer of the case: built in, or a `tokenizer.json` next to the scenario.
    pub fn tokenizer(&self) -> crate::engine::diagnosis::Result<crate::io::tokenizer::Tokenizer> {
        match self.scenario.tokenizer.as_deref() {
            None | Some("builtin") => crate::io::tokenizer::Tokenizer::builtin(),
            Some(f) => {
                crate::io::tokenizer::Tokenizer::from_file(self.dir.join(portable(Path::new(f))))
            }
        }
    }

    /// The adapter folder, resolved against the scenario's folder.
    pub fn adapter_dir(&self) -> Option<PathBuf> {
        self.scenario
            .prefix
            .adapter
            .as_ref()
            .map(|a| self.dir.join(portable(a)))
    }

    /// The expectation on this platform: `expect_on.<os>` when given, else `expect`.
    pub fn expect(&self) -> &Expect {
        Platform::current()
            .and_then(|p| self.scenario.expect_on.get(&p))
            .map(|e| &e.0)
            .unwrap_or(&self.scenario.expect)
    }

    /// Whether the case runs on this platform, and if not why.
    pub fn skip_reason(&self) -> Option<String> {
        let wanted = self.scenario.platforms.as_ref()?;
        match Platform::current() {
            Some(p) if wanted.contains(&p) => None,
            _ => Some(format!(
                "meant for {}; this is {}",
                wanted
                    .iter()
                    .map(Platform::name)
                    .collect::<Vec<_>>()
                    .join(", "),
                std::env::consts::OS
            )),
        }
    }
}

/// Write every relative path with `/`, whatever separator the file used, so a
/// scenario serialises (snapshots, shrunk files, reports) the same on every OS.
fn normalise_paths(s: &mut Scenario) {
    let fix = |p: &mut PathBuf| *p = PathBuf::from(p.to_string_lossy().replace('\\', "/"));
    if let Some(p) = s.data.file.as_mut() {
        fix(p);
    }
    if let Some(p) = s.prefix.adapter.as_mut() {
        fix(p);
    }
    if let Some(p) = s.model.path.as_mut() {
        fix(p);
    }
    if let Some(t) = s.tokenizer.as_mut() {
        *t = t.replace('\\', "/");
    }
}

/// Every path a scenario names must stay inside its folder (symlinks resolved first).
pub fn check_paths_inside(s: &Scenario, dir: &Path) -> Result<(), (String, String)> {
    let base = dir
        .canonicalize()
        .or_else(|_| std::env::current_dir())
        .unwrap_or_default();
    let mut named: Vec<(&str, PathBuf)> = vec![];
    if let Some(f) = &s.data.file {
        named.push(("data.file", f.clone()));
    }
    if let Some(a) = &s.prefix.adapter {
        named.push(("prefix.adapter", a.clone()));
    }
    if let Some(p) = &s.model.path {
        named.push(("model.path", p.clone()));
    }
    if let Some(t) = s.tokenizer.as_deref().filter(|t| *t != "builtin") {
        named.push(("tokenizer", PathBuf::from(t)));
    }
    for (field, p) in named {
        let full = dir.join(portable(&p));
        // Validation already checked that the file exists; resolve symlinks and `..`.
        let Ok(real) = full.canonicalize() else {
            continue;
        };
        if !real.starts_with(&base) {
            return Err((
                field.to_string(),
                format!(
                    "`{}` resolves to {}, outside the scenario's folder {}; pass --allow-outside-paths to allow it",
                    slash(&p),
                    slash(&real),
                    slash(&base)
                ),
            ));
        }
    }
    Ok(())
}

/// A relative path written in a scenario, with `/` or `\\` separators, for this OS.
pub fn portable(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let text = p.to_string_lossy();
    text.split(['/', '\\']).filter(|s| !s.is_empty()).collect()
}

/// A path for messages and reports: `/`-separated whatever the OS.
pub fn slash(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

/// Check that a matrix key names a field a scenario can have.
fn check_matrix_path(doc: &Value, key: &str) -> Result<(), String> {
    const TOP: &[&str] = &[
        "name",
        "description",
        "tags",
        "model",
        "prefix",
        "cache",
        "data",
        "generate",
        "train",
        "platforms",
        "expect",
    ];
    const SECTIONS: &[(&str, &[&str])] = &[
        (
            "model",
            &["family", "config", "seed", "path", "hub", "revision"],
        ),
        (
            "prefix",
            &[
                "virtual_tokens",
                "projection",
                "encoder_hidden_size",
                "init",
                "layout",
                "heads_from",
                "head_dim_from",
                "extend_mask",
                "cross",
                "seed",
            ],
        ),
        (
            "cache",
            &[
                "mode",
                "max_len",
                "window",
                "cross_prefix_marks_updated",
                "save_at",
                "ring_head_lost_on_load",
                "bits",
                "residual",
                "prefix_full_precision",
                "capacity_without_prefix",
            ],
        ),
        (
            "data",
            &[
                "prompts",
                "file",
                "batch_size",
                "max_prompt_len",
                "padding_side",
            ],
        ),
        (
            "generate",
            &[
                "strategy",
                "max_new_tokens",
                "eos_token_id",
                "pad_token_id",
                "num_return_sequences",
                "expand_prefix",
                "prefill_chunk",
                "chunk_mask",
                "mask_buffer_one_row",
                "merge_rows_at",
                "merge_fill_from_first_row",
            ],
        ),
        (
            "train",
            &[
                "steps",
                "lr",
                "weight_decay",
                "seed",
                "batch_size",
                "max_len",
                "evaluate",
            ],
        ),
    ];
    let parts: Vec<&str> = key.split('.').collect();
    if !TOP.contains(&parts[0]) {
        let hint = suggest(parts[0], TOP)
            .map(|s| format!(", did you mean `{s}`?"))
            .unwrap_or_default();
        return Err(format!("unknown field `{}`{hint}", parts[0]));
    }
    if parts.len() >= 2 {
        if let Some((_, fields)) = SECTIONS.iter().find(|(s, _)| *s == parts[0]) {
            // model.config.<anything> is checked when the case is built.
            if !fields.contains(&parts[1]) {
                let hint = suggest(parts[1], fields)
                    .map(|s| format!(", did you mean `{}.{s}`?", parts[0]))
                    .unwrap_or_default();
                return Err(format!("unknown field `{key}`{hint}"));
            }
            if parts.len() > 2 && !(parts[0] == "model" && parts[1] == "config") {
                return Err(format!("`{key}` is not a field path"));
            }
        }
    }
    let _ = doc;
    Ok(())
}

/// Set a dotted path in a JSON document, creating mappings on the way.
fn set_path(doc: &mut Value, key: &str, value: Value) {
    let mut cur = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        let m = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            m.insert(part.to_string(), value);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

/// The 1-based line where the last segment of `field` is written as a key, if it is
/// written exactly once.
fn locate(text: &str, field: &str) -> Option<usize> {
    // Matrix keys are written whole (`prefix.virtual_tokens:` under `matrix:`).
    let key = match field.strip_prefix("matrix.") {
        Some(k) if !k.is_empty() => k,
        _ => field.rsplit('.').next()?,
    };
    if key.is_empty() {
        return None;
    }
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|(i, _)| i + 1)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The closest candidate to `word` (edit distance at most 3), for "did you mean".
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= 3.min(word.len().max(1)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Turn a YAML/serde error into an input error with line, column, the dotted field
/// path written there, and, for an unknown field, the closest known one.
fn yaml_error(path: &Path, text: &str, e: &serde_saphyr::Error) -> InputError {
    let loc = e.location();
    let (line, column) = (
        loc.map(|l| l.line() as usize),
        loc.map(|l| l.column() as usize),
    );
    let full = e.to_string();
    // "error: line L column C: MESSAGE" then a rendered snippet.
    let first = full.lines().next().unwrap_or("").trim();
    let mut message = match first
        .find(": ")
        .filter(|_| first.starts_with("error: line "))
    {
        Some(_) => first.splitn(3, ": ").nth(2).unwrap_or(first).to_string(),
        None => first.trim_start_matches("error: ").to_string(),
    };
    let mut field = line.map(|l| field_at(text, l)).unwrap_or_default();
    let inner = innermost(e);
    if let serde_saphyr::Error::Budget { breach, .. } = inner {
        message = budget_message(breach);
    } else if let serde_saphyr::Error::AliasReplayLimitExceeded { .. } = inner {
        message = budget_message(&serde_saphyr::budget::BudgetBreach::Nodes { nodes: 0 });
    } else if message.starts_with("multiple YAML documents detected") {
        message =
            "a scenario file holds one YAML document; a second one starts here (`---`)".into();
        field.clear();
    } else if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        message = format!("duplicate key `{key}`");
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        // The parser stops at a sibling key (or the section's own key at the top
        // level): name the missing field, not that one.
        let missing = rest.split('`').next().unwrap_or(rest);
        let parent = field.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        field = if parent.is_empty() {
            missing.to_string()
        } else {
            format!("{parent}.{missing}")
        };
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((unknown, tail)) = rest.split_once('`') {
            let expected: Vec<&str> = tail
                .trim_start_matches(", expected one of ")
                .trim_start_matches(", expected ")
                .split(", ")
                .map(|s| s.trim_matches('`'))
                .filter(|s| !s.is_empty())
                .collect();
            if let Some(s) = suggest(unknown, &expected) {
                message = format!(
                    "unknown variant `{unknown}`, did you mean `{s}`? (expected one of: {})",
                    expected.join(", ")
                );
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((unknown, tail)) = rest.split_once('`') {
            let expected: Vec<&str> = tail
                .trim_start_matches(", expected one of ")
                .trim_start_matches(", expected ")
                .split(", ")
                .map(|s| s.trim_matches('`'))
                .filter(|s| !s.is_empty())
                .collect();
            let hint = suggest(unknown, &expected)
                .map(|s| format!(", did you mean `{s}`?"))
                .unwrap_or_default();
            message = format!(
                "unknown field `{unknown}`{hint} (expected one of: {})",
                expected.join(", ")
            );
        }
    } else if message.starts_with("invalid u") || message.starts_with("invalid i") {
        let got = line
            .and_then(|l| text.lines().nth(l - 1))
            .and_then(|t| t.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        message = format!("expected a non-negative whole number, got `{got}`");
    }
    let syntax = matches!(
        inner,
        serde_saphyr::Error::ExternalMessage { source, .. }
            if matches!(**source, serde_saphyr::localizer::ExternalMessageSource::Parser(_))
    );
    if let Some((l, c, open)) = line.filter(|_| syntax).and_then(|l| unclosed_flow(text, l)) {
        message += &format!(" (is the `{open}` opened at line {l} column {c} closed?)");
    }
    InputError {
        file: path.to_path_buf(),
        line,
        column,
        field,
        message,
    }
}

/// The error under snippet and alias wrappers.
fn innermost(e: &serde_saphyr::Error) -> &serde_saphyr::Error {
    match e.without_snippet() {
        serde_saphyr::Error::AliasError { error, .. } => innermost(error),
        other => other,
    }
}

/// What a budget breach means for a scenario author.
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Nodes { .. } | B::Events { .. } | B::Aliases { .. } | B::AliasAnchorRatio { .. } => {
            format!(
                "the YAML expands to more than {MAX_YAML_NODES} nodes (aliases count expanded); scenario files are limited to {MAX_YAML_NODES}"
            )
        }
        B::Depth { .. } => format!(
            "the YAML nests deeper than {MAX_YAML_DEPTH} levels; scenario files are limited to {MAX_YAML_DEPTH}"
        ),
        B::Documents { .. } => "a scenario file holds one YAML document".into(),
        other => format!("the YAML is over a parser limit ({other:?})"),
    }
}

/// A flow collection (`[` or `{`) opened before 1-based `line` and still open at its
/// start: `(line, column, bracket)` of the opener. Quotes and comments are skipped.
fn unclosed_flow(text: &str, line: usize) -> Option<(usize, usize, char)> {
    let mut open: Vec<(usize, usize, char)> = vec![];
    for (i, l) in text.lines().enumerate().take(line.saturating_sub(1)) {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (j, ch) in l.chars().enumerate() {
            match (quote, ch) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') if prev == ' ' || "[{,:".contains(prev) => quote = Some(ch),
                (None, '#') if prev == ' ' || j == 0 => break,
                (None, '[' | '{') => open.push((i + 1, j + 1, ch)),
                (None, ']' | '}') => {
                    open.pop();
                }
                _ => {}
            }
            prev = ch;
        }
    }
    open.first().copied()
}

/// The dotted path of the key written on 1-based `line`, from indentation
/// (`prefix.virtual_tokens`); empty when the line holds no key.
fn field_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(target) = lines.get(line.wrapping_sub(1)) else {
        return String::new();
    };
    let key_of = |l: &str| -> Option<(usize, String)> {
        let indent = l.len() - l.trim_start().len();
        let t = l.trim_start().trim_start_matches("- ");
        let (k, _) = t.split_once(':')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('#') && !k.contains(' ')).then(|| (indent, k.to_string()))
    };
    let Some((mut indent, key)) = key_of(target) else {
        return String::new();
    };
    let mut path = vec![key];
    for l in lines[..line - 1].iter().rev() {
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
                if i == 0 {
                    break;
                }
            }
        }
    }
    path.reverse();
    path.join(".")
}

/// Every scenario file under `paths` (files, folders searched recursively for
/// `.yaml`/`.yml`, or glob patterns), sorted, without duplicates.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = vec![];
    for p in paths {
        let s = p.to_string_lossy();
        if s.contains('*') || s.contains('?') || s.contains('[') {
            let entries = glob::glob(&s).map_err(|e| InputError {
                file: p.clone(),
                line: None,
                column: None,
                field: String::new(),
                message: format!("invalid glob pattern: {e}"),
            })?;
            let mut any = false;
            for entry in entries.flatten() {
                any = true;
                collect(&entry, &mut out);
            }
            if !any {
                return Err(not_found(p, "no file matches this pattern"));
            }
        } else if p.exists() {
            collect(p, &mut out);
        } else {
            return Err(not_found(p, "no such file or folder"));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn not_found(p: &Path, m: &str) -> InputError {
    InputError {
        file: p.to_path_buf(),
        line: None,
        column: None,
        field: String::new(),
        message: m.to_string(),
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries {
            collect(&e, out);
        }
    } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
        out.push(p.to_path_buf());
    }
}
