//! Helpers shared by the test modules: tiny seeded models, prompts, comparisons,
//! temporary folders, the binary, blessing and proptest settings.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode, Layout, ModelCache};
use prefix_harness::engine::diagnosis::Result as EngineResult;
use prefix_harness::engine::generate::forward_logits;
use prefix_harness::engine::model::{weights, Encoded, Family, Forward, Model, ModelConfig, Ops};
use prefix_harness::engine::prefix::{inject, PrefixConfig, PrefixEncoder, PrefixLayout};
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

pub const SEED: u64 = 20261128;

pub fn tiny_model(family: Family) -> Box<dyn Model> {
    ModelConfig::tiny(family)
        .build(weights::seeded(SEED, DType::F32, &Device::Cpu))
        .expect("tiny model builds")
}

pub fn prefix(model: &dyn Model, p: usize) -> PrefixEncoder {
    let mut cfg = PrefixConfig::new(p);
    cfg.seed = SEED + 1;
    PrefixEncoder::new(&cfg, &model.geometry(), &Device::Cpu).expect("prefix builds")
}

/// A cache mode by its rstest name, with the static capacity and sliding window given.
pub fn cache_mode(name: &str, static_max_len: usize, window: usize) -> CacheMode {
    match name {
        "none" => CacheMode::None,
        "dynamic" => CacheMode::Dynamic,
        "static" => CacheMode::Static {
            max_len: static_max_len,
        },
        "sliding" => CacheMode::Sliding { window },
        "legacy" => CacheMode::Legacy,
        "hybrid" => CacheMode::Hybrid { max_len: None },
        other => panic!("unknown mode {other}"),
    }
}

/// An `#[rstest]` test whose first parameter, `family: Family`, takes each family of a
/// named list, in the form of ripgrep's `rgtest!` (so that rustfmt formats the body):
///
/// `family_test!(CLASSIC, name, |family: Family, #[values(..)] mode: &str| { .. });`
///
/// defines `fn name` with `#[values(<the list>)] family` and the closure's other
/// parameters, rstest attributes included. The lists: `CLASSIC` (gpt2, llama, bloom,
/// gpt_bigcode, t5: every generation strategy and training), `BEFORE_GEMMA` (every
/// family before the two Gemmas: those `quantized.rs` measured its 8-bit drift bound
/// on) and `ALL` (every family, in `Family::ALL`'s order). A new family goes into `ALL`.
macro_rules! family_test {
    (CLASSIC, $($test:tt)*) => {
        family_test!(@list [Gpt2, Llama, Bloom, GptBigcode, T5], $($test)*);
    };
    (BEFORE_GEMMA, $($test:tt)*) => {
        family_test!(
            @list [Gpt2, Llama, Bloom, GptBigcode, T5, Qwen2, Mistral, Qwen3, Phi3, GptNeox],
            $($test)*
        );
    };
    (ALL, $($test:tt)*) => {
        family_test!(
            @list [
                Gpt2, Llama, Bloom, GptBigcode, T5, Qwen2, Mistral, Qwen3, Phi3, GptNeox,
                Gemma2, Gemma3
            ],
            $($test)*
        );
    };
    (
        @list [$($f:ident),*],
        $name:ident,
        |$family:ident: Family $(, $(#[$($attr:tt)*])* $param:ident: $ty:ty)* $(,)?| { $($body:tt)* }
    ) => {
        #[rstest::rstest]
        fn $name(
            #[values($(Family::$f),*)]
            $family: Family,
            $($(#[$($attr)*])* $param: $ty),*
        ) {
            $($body)*
        }
    };
}
pub(crate) use family_test;

/// A `[B, S]` prompt of distinct-looking rows (row r is shifted by 37 r).
pub fn prompt(batch: usize, seq: usize) -> Tensor {
    let data: Vec<u32> = (0..batch)
        .flat_map(|r| (0..seq).map(move |i| ((i * 13 + r * 37 + 5) % 250) as u32 + 3))
        .collect();
    Tensor::from_vec(data, (batch, seq), &Device::Cpu).expect("prompt")
}

/// Our logits `[B, S, V]` for `ids` `[B, S]`, with `prefix` (or none) and a cache in `mode`.
pub fn logits_with(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    mode: CacheMode,
    ids: &Tensor,
) -> Tensor {
    forward_logits(
        model,
        prefix,
        &CacheConfig::new(mode),
        Ops::Kernels,
        ids,
        None,
    )
    .expect("forward")
    .0
}

/// Our model of `mc` and the exact weights it was built from (seeded with `seed`), for
/// loading a reference implementation.
pub fn build_with_weights(
    mc: &ModelConfig,
    seed: u64,
    dev: &Device,
) -> (Box<dyn Model>, HashMap<String, Tensor>) {
    let model = mc
        .build(weights::seeded(seed, DType::F32, dev))
        .expect("model builds");
    let map = weights::materialize(mc, seed, dev).expect("weights");
    (model, map)
}

/// The `[2, 7]` token ids of the parity tests.
pub fn parity_prompt(dev: &Device) -> Tensor {
    Tensor::new(
        &[[1u32, 17, 42, 99, 3, 250, 8], [5, 5, 200, 13, 77, 0, 128]],
        dev,
    )
    .expect("prompt")
}

/// The largest difference between our logits `[B, S, V]` and a reference whose
/// `forward(ids [B, S'], offset)` returns the last position's logits `[B, 1, V]` (and
/// starts from an empty KV cache at offset 0): once over the whole prompt, then one
/// token at a time through its KV cache (every position).
pub fn worst_diff(
    ours: &Tensor,
    ids: &Tensor,
    mut forward: impl FnMut(&Tensor, usize) -> Tensor,
) -> f32 {
    let s = ids.dim(1).expect("[B, S] ids, [B, S, V] logits");
    let last = ours
        .narrow(1, s - 1, 1)
        .expect("[B, S] ids, [B, S, V] logits");
    let mut worst = max_abs_diff(&last, &forward(ids, 0));
    for pos in 0..s {
        let tok = ids.narrow(1, pos, 1).expect("[B, S] ids, [B, S, V] logits");
        let ours_pos = ours
            .narrow(1, pos, 1)
            .expect("[B, S] ids, [B, S, V] logits");
        worst = worst.max(max_abs_diff(&ours_pos, &forward(&tok, pos)));
    }
    worst
}

/// Our logits `[B, S, V]` of `mc` (seeded with `seed`) for `ids`, no prefix, flattened.
pub fn flat_logits(mc: ModelConfig, seed: u64, ids: &Tensor) -> Vec<f32> {
    let model = mc
        .build(weights::seeded(seed, DType::F32, ids.device()))
        .expect("model builds");
    flat_logits_of(model.as_ref(), ids)
}

/// Our logits `[B, S, V]` of `model` for `ids: [B, S]`, no prefix, flattened.
pub fn flat_logits_of(model: &dyn Model, ids: &Tensor) -> Vec<f32> {
    logits_with(model, None, CacheMode::Dynamic, ids)
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("logits")
}

/// The seed of the per-family tests' weights.
pub const FAMILY_SEED: u64 = 7;

/// The `[2, 12]` token ids of the per-family tests: longer than the tiny configs'
/// windows (Gemma 2: 8, Gemma 3: 6).
pub fn long_prompt() -> Tensor {
    Tensor::new(
        &[
            [1u32, 17, 42, 99, 3, 250, 8, 64, 9, 31, 120, 7],
            [5, 200, 13, 77, 0, 128, 44, 2, 19, 230, 6, 90],
        ],
        &Device::Cpu,
    )
    .expect("prompt")
}

/// The `ModelConfig` a `config.json` text parses to (panics naming the text and the
/// error).
pub fn parse_hf_config(json: &str) -> ModelConfig {
    ModelConfig::from_hf_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// `fn parse(json: &str) -> CONFIG`: the config of family `VARIANT` a `config.json` text
/// parses to (panics on an error or another family): `family_parser!(Gemma2,
/// gemma2::Config);`.
macro_rules! family_parser {
    ($variant:ident, $config:ty) => {
        fn parse(json: &str) -> $config {
            match $crate::common::parse_hf_config(json) {
                ModelConfig::$variant(c) => c,
                other => panic!("not {}: {other:?}", stringify!($variant)),
            }
        }
    };
}
pub(crate) use family_parser;

/// The weights of `mc` seeded with [`FAMILY_SEED`], by parameter name, after checking
/// that each of `present` is among them and that each `(name, dims)` has those dims.
#[track_caller]
pub fn family_parameters(
    mc: &ModelConfig,
    present: &[&str],
    dims: &[(&str, Vec<usize>)],
) -> HashMap<String, Tensor> {
    let names = weights::materialize(mc, FAMILY_SEED, &Device::Cpu).expect("weights");
    for n in present {
        assert!(names.contains_key(*n), "{n} not in {:?}", names.keys());
    }
    for (n, want) in dims {
        assert_eq!(names[*n].dims(), want.as_slice(), "{n}");
    }
    names
}

/// A change of a family's config, named by what it does.
pub type ConfigChange<C> = (&'static str, fn(&mut C));

/// Checks that each change of a family's `tiny()` config, made on its own, moves its
/// logits on `ids: [B, S]` (no prefix, weights seeded with [`FAMILY_SEED`]) by more than
/// `min` (the largest |difference|): each piece of the family reaches the logits, so a
/// test against a reference that lacked it too would not pass by accident. `family`
/// wraps the config (`ModelConfig::Gemma2`). Returns the flattened logits of `tiny()`.
#[track_caller]
pub fn assert_each_change_moves_logits<C>(
    tiny: fn() -> C,
    family: fn(C) -> ModelConfig,
    ids: &Tensor,
    min: f32,
    changes: &[ConfigChange<C>],
) -> Vec<f32> {
    let logits = |cfg: C| flat_logits(family(cfg), FAMILY_SEED, ids);
    let base = logits(tiny());
    for (what, change) in changes {
        let mut cfg = tiny();
        change(&mut cfg);
        let d = max_diff(&base, &logits(cfg));
        assert!(d > min, "{what}: logits moved by only {d}");
    }
    base
}

/// Checks a family's parameters (see [`family_parameters`]): tied embeddings (no
/// `lm_head.weight`) and no bias anywhere.
#[track_caller]
pub fn assert_tied_without_biases(names: &HashMap<String, Tensor>) {
    assert!(!names.contains_key("lm_head.weight"), "tied embeddings");
    assert!(!names.keys().any(|k| k.ends_with(".bias")));
}

/// `map` with each tensor whose name ends with `suffix` replaced by `f` of it.
pub fn replaced(
    map: &HashMap<String, Tensor>,
    suffix: &str,
    f: impl Fn(&Tensor) -> Tensor,
) -> HashMap<String, Tensor> {
    map.iter()
        .map(|(name, t)| {
            let t = if name.ends_with(suffix) {
                f(t)
            } else {
                t.clone()
            };
            (name.clone(), t)
        })
        .collect()
}

/// A `dynamic` cache holding `prefix` for `batch` rows, injected as PEFT injects it;
/// `self_only` drops the cross-attention part (what PEFT 0.21.2 does for
/// encoder-decoders).
pub fn prefix_cache(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    batch: usize,
    self_only: bool,
) -> ModelCache {
    let g = model.geometry();
    let mut mc = ModelCache::new(
        CacheConfig::new(CacheMode::Dynamic),
        model.family().legacy_layout(),
        g.num_layers,
        g.encoder_decoder,
    );
    let mut pkv = prefix.past_key_values(batch).expect("prefix");
    if self_only {
        for lp in &mut pkv {
            lp.cross = None;
        }
    }
    inject(
        &mut mc,
        &pkv,
        PrefixLayout::Auto,
        prefix.geometry.num_virtual_tokens,
    )
    .expect("inject");
    mc
}

/// One forward pass of `model` over `ids: [B, S]` through the cache `mc`, with the mask
/// `mask: [B, past + S]` (prefix columns first) and, for an encoder-decoder, the
/// encoder output: logits `[B, S, V]` at every position with the crate's kernels, or
/// the engine's error.
pub fn pass(
    model: &dyn Model,
    ids: &Tensor,
    mc: &mut ModelCache,
    mask: &Tensor,
    encoder: Option<&Encoded>,
) -> EngineResult<Tensor> {
    model.forward(
        ids,
        &mut Forward {
            cache: mc,
            mask,
            encoder,
            last_only: false,
            ops: Ops::Kernels,
        },
    )
}

/// Checks that `text` contains `part`, showing `text` when it does not.
#[track_caller]
pub fn assert_contains(text: &str, part: &str) {
    assert!(text.contains(part), "no `{part}` in:\n{text}");
}

/// The largest |a - b| over two slices of the same length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// The shape a stored self-attention key must have in `layout`.
pub fn stored_key_shape(layout: Layout, b: usize, kvh: usize, len: usize, d: usize) -> Vec<usize> {
    match layout {
        Layout::Standard => vec![b, kvh, len, d],
        Layout::BloomLegacy => vec![b * kvh, d, len],
        Layout::BigcodeFused => vec![b, len, 2 * d],
    }
}

/// The shape a stored self-attention value must have in `layout` (keys: see
/// [`stored_key_shape`]).
pub fn stored_value_shape(
    layout: Layout,
    b: usize,
    kvh: usize,
    len: usize,
    d: usize,
) -> Vec<usize> {
    match layout {
        Layout::Standard => vec![b, kvh, len, d],
        Layout::BloomLegacy => vec![b * kvh, len, d],
        Layout::BigcodeFused => vec![b, len, 2 * d],
    }
}

/// The batch rows a stored tensor of `layout` holds (Bloom's legacy layout folds the
/// KV heads into its first dimension).
pub fn stored_batch(layout: Layout, shape: &[usize], kvh: usize) -> usize {
    let first = shape.first().copied().unwrap_or(0);
    match layout {
        Layout::BloomLegacy => first / kvh.max(1),
        _ => first,
    }
}

/// A temporary folder removed on drop: `<temp>/ph-<pid>-<tag>-<n>`.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ph-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `name`'s path in the crate (data files: `tests/fixtures/...`, `scenarios/...`).
pub fn repo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// Write `body` to `dir/name`; the path as text.
pub fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write a test file");
    p.to_string_lossy().into_owned()
}

/// A JSON file's value.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `prefix-harness` binary, with `CI=true`.
pub fn harness() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prefix-harness"));
    c.env("CI", "true");
    c
}

/// `prefix-harness ARGS`, run to its end.
pub fn run_cli(args: &[&str]) -> Output {
    harness().args(args).output().expect("the binary runs")
}

/// A child's output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A finished run's stdout and stderr as text, after checking its exit code (both
/// streams in the message when it is another).
#[track_caller]
pub fn exited(out: &Output, code: i32) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "{stdout}{stderr}");
    (stdout, stderr)
}

/// `BLESS=1` (not empty, not `0`): rewrite the expected files instead of comparing.
pub fn blessing() -> bool {
    std::env::var_os("BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Proptest settings: `PROPTEST_CASES` cases (else `default_cases`), failing seeds kept
/// in `<test file>.proptest-regressions` beside the test's source file.
pub fn proptest_config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}
