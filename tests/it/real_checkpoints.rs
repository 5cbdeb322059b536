//! Parity with the real stack: tiny models made by transformers 5.24 and prefix-tuning
//! adapters made by PEFT 0.21.2 (`ci/fixtures/make_fixtures.py`, committed under
//! `tests/fixtures/`), loaded through the same Hugging Face cache path a user's
//! `model: {hub: ...}` takes (each test builds a temporary cache), must give PEFT's
//! logits (max abs diff <= 1e-4, printed per case) and its greedy tokens exactly.
//!
//! References, as recorded in each `expected.json`:
//! - `logits`: `PeftModel.from_pretrained(model, adapter)(**inputs).logits`.
//! - `greedy.tokens`: greedy decoding through PEFT's forward pass (8 new tokens, EOS
//!   disabled), checked by the script against a cached decode from PEFT's own
//!   `get_prompt` cache. NOT `PeftModel.generate()`: on this stack it silently drops the
//!   prefix (transformers 5.24 renamed `past_key_values` to `cache`; PEFT still injects
//!   the prefix under the old name, which transformers ignores when `cache` is also
//!   set). Its tokens are recorded as `peft_generate_tokens` (see ci/fixtures/README.md).
//!
//! PEFT quirks matched here:
//! - T5 (`SEQ_2_SEQ_LM`): PEFT duplicates the prefix along the layer axis (decoder layers
//!   g and g + L/2 get the same keys/values) and then REPLACES the cross-attention cache
//!   with an empty one, so only the self-attention prefix reaches the model. Our engine
//!   injects the cross part too; the T5 tests drop it to match and also print the
//!   difference with it kept.
//! - PEFT 0.21.2 derives the T5 prefix `token_dim` from `d_model`, not `d_kv`: with
//!   d_kv != d_model / num_heads its default adapter crashes transformers inside the
//!   cache (`t5-dkv-peft-default`); we diagnose it as `head-dim` before running. The
//!   other T5 fixtures pass `token_dim = num_heads * d_kv` explicitly.
//! - Left padding: the engine derives position ids from the padding mask, as
//!   transformers' `generate()` does, so the left-padded cases compare with PEFT's
//!   forward given those position ids (`logits_mask_positions`), on real tokens (the
//!   position of a padding token is a convention and its output is never used). PEFT's
//!   forward WITHOUT position ids keeps positions P.. on every row; that comparison is
//!   the ignored test `left_padding_against_peft_forward_without_position_ids`.
//! - T5 v1.1 as transformers 5.24 saves it (`scale_decoder_outputs: false`): the test
//!   `t5_v1_1_unscaled_tied_head`.

use crate::common::TempDir;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use prefix_harness::adapter::{self, load_for};
use prefix_harness::cache::{CacheConfig, CacheMode, ModelCache};
use prefix_harness::check::DiagnosisClass;
use prefix_harness::generate::{forward_logits, greedy, DecodeOptions};
use prefix_harness::hub::{self, HubOptions, ModelSource};
use prefix_harness::model::{Forward, Model};
use prefix_harness::prefix::{extend_mask, inject, PrefixEncoder, PrefixLayout};
use serde::Deserialize;

/// Bound on the max abs logit difference (f32).
const TOL: f32 = 1e-4;

// ---------------------------------------------------------------------------------
// Fixtures and the temporary Hugging Face cache
// ---------------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Debug, Deserialize)]
struct Expected {
    case: String,
    family: String,
    model: String,
    prefix: ExpectedPrefix,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    decoder_input_ids: Option<Vec<Vec<u32>>>,
    #[serde(default)]
    reference_error: Option<String>,
    #[serde(default)]
    logits_shape: Vec<usize>,
    #[serde(default)]
    logits: Vec<f32>,
    #[serde(default)]
    logits_mask_positions: Option<Vec<f32>>,
    /// The reference's own float32 error (against the same model in float64).
    #[serde(default)]
    float32_error: Option<f64>,
    #[serde(default)]
    greedy: Option<ExpectedGreedy>,
}

#[derive(Debug, Deserialize)]
struct ExpectedPrefix {
    num_virtual_tokens: usize,
    prefix_projection: bool,
    num_layers: usize,
    num_attention_heads: usize,
    token_dim: usize,
    num_transformer_submodules: usize,
}

#[derive(Debug, Deserialize)]
struct ExpectedGreedy {
    max_new_tokens: usize,
    tokens: Vec<Vec<u32>>,
    min_top2_margin: f64,
    peft_generate_tokens: Vec<Vec<u32>>,
    no_prefix_tokens: Vec<Vec<u32>>,
    #[serde(default)]
    tokens_mask_positions: Option<Vec<Vec<u32>>>,
}

fn expected(case: &str) -> Expected {
    let p = fixtures().join(case).join("expected.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fake commit hash for a repository (40 hex digits).
fn commit_of(repo_id: &str) -> String {
    let h = prefix_harness::rng::fnv1a(repo_id.as_bytes());
    format!("{h:016x}{:016x}{:08x}", h.rotate_left(23), h as u32)
}

/// How `refs/<revision>` is written.
#[derive(Clone, Copy, PartialEq)]
enum RefStyle {
    /// The commit hash without a newline (what huggingface_hub writes).
    Plain,
    /// With a trailing newline (hf-hub 0.4.3 alone cannot read it).
    Newline,
    /// No ref at all: only reachable by its commit hash.
    None,
}

/// Put the files of `src` into `cache` as huggingface_hub lays out a download of
/// `repo_id` at `main`: `blobs/<hash>`, `snapshots/<commit>/<file>` (a relative
/// symbolic link to the blob on Unix, a copy elsewhere) and `refs/main`.
fn add_repo(cache: &Path, repo_id: &str, src: &Path, style: RefStyle) -> String {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = commit_of(repo_id);
    let snap = repo.join("snapshots").join(&commit);
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    std::fs::create_dir_all(repo.join("blobs")).expect("blobs dir");
    for e in std::fs::read_dir(src).expect("list fixture") {
        let e = e.expect("entry");
        if !e.path().is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path()).expect("read fixture");
        let blob = format!("{:016x}", prefix_harness::rng::fnv1a(&bytes));
        std::fs::write(repo.join("blobs").join(&blob), &bytes).expect("blob");
        let link = snap.join(e.file_name());
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), &link).expect("link");
        #[cfg(not(unix))]
        std::fs::write(&link, &bytes).expect("copy");
    }
    let text = match style {
        RefStyle::Plain => Some(commit.clone()),
        RefStyle::Newline => Some(format!("{commit}\n")),
        RefStyle::None => None,
    };
    if let Some(t) = text {
        std::fs::create_dir_all(repo.join("refs")).expect("refs dir");
        std::fs::write(repo.join("refs/main"), t).expect("ref");
    }
    commit
}

/// A temporary cache holding the fixture's model as `fixtures/<model>` and its adapter
/// as `fixtures/<case>-adapter`.
fn cache_for(exp: &Expected) -> TempDir {
    let dir = TempDir::new(&exp.case);
    add_repo(
        dir.path(),
        &format!("fixtures/{}", exp.model),
        &fixtures().join("models").join(&exp.model),
        RefStyle::Plain,
    );
    add_repo(
        dir.path(),
        &format!("fixtures/{}-adapter", exp.case),
        &fixtures().join(&exp.case).join("adapter"),
        RefStyle::Plain,
    );
    dir
}

/// Model and adapter of a fixture, loaded from the temporary cache as a scenario with
/// `model: {hub: fixtures/<model>}` and an adapter from the hub would load them.
fn load_case(exp: &Expected, cache: &Path) -> (Box<dyn Model>, PrefixEncoder) {
    let dev = Device::Cpu;
    let opts = HubOptions::with_cache_dir(cache);
    let source = ModelSource::hub(&format!("fixtures/{}", exp.model), None).expect("source");
    let (cfg, model, tok) = hub::load_model_with(&source, &opts, &dev)
        .unwrap_or_else(|e| panic!("{}: load model: {e}", exp.case));
    assert_eq!(cfg.family().name(), exp.family);
    assert!(tok.is_none(), "the fixtures have no tokenizer.json");
    let adapter_dir = ModelSource::hub(&format!("fixtures/{}-adapter", exp.case), None)
        .expect("source")
        .resolve_dir(&opts, &[adapter::CONFIG_FILE, adapter::WEIGHTS_FILE])
        .expect("adapter in cache");
    let (acfg, prefix) = load_for(&adapter_dir, &model.geometry(), &dev)
        .unwrap_or_else(|e| panic!("{}: load adapter: {e}", exp.case));
    let p = &exp.prefix;
    assert_eq!(acfg.num_virtual_tokens, p.num_virtual_tokens);
    assert_eq!(acfg.prefix_projection, p.prefix_projection);
    let g = prefix.geometry;
    assert_eq!(
        (
            g.num_layers,
            g.num_attention_heads,
            g.token_dim,
            g.num_transformer_submodules
        ),
        (
            p.num_layers,
            p.num_attention_heads,
            p.token_dim,
            p.num_transformer_submodules
        ),
        "{}: adapter geometry",
        exp.case
    );
    (model, prefix)
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).expect("ids")
}

// ---------------------------------------------------------------------------------
// Our forward pass and greedy decoding, PEFT-style
// ---------------------------------------------------------------------------------

/// A dynamic cache holding the prefix; `self_only` drops the cross-attention part (what
/// PEFT 0.21.2 does for encoder-decoders).
fn prefix_cache(
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

/// Logits `[B, S, V]` of one forward pass as PEFT's `forward` computes them: the padding
/// mask extended by P ones; for T5 the encoder reads `ids` with `pad`, the decoder
/// `dec`, and `self_only` drops the cross prefix.
fn forward(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    ids: &Tensor,
    pad: &Tensor,
    dec: Option<&Tensor>,
    self_only: bool,
) -> Tensor {
    let b = ids.dim(0).expect("batch");
    let p = prefix.geometry.num_virtual_tokens;
    let mut mc = prefix_cache(model, prefix, b, self_only);
    let (input, encoded, mask) = match dec {
        Some(dec) => {
            let enc = model.encode(ids, pad).expect("encode");
            let t = dec.dim(1).expect("decoder length");
            let ones = Tensor::ones((b, t), DType::F32, &Device::Cpu).expect("mask");
            (dec.clone(), Some(enc), extend_mask(&ones, p).expect("mask"))
        }
        None => (ids.clone(), None, extend_mask(pad, p).expect("mask")),
    };
    mc.next_step();
    model
        .forward(
            &input,
            &mut Forward {
                cache: &mut mc,
                mask: &mask,
                encoder: encoded.as_ref(),
                last_only: false,
            },
        )
        .expect("forward")
}

/// T5 greedy decoding with the self-attention prefix only (PEFT's cache), cached, from
/// the decoder start token: tokens `[B][n]`.
fn greedy_t5_self_only(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    ids: &Tensor,
    pad: &Tensor,
    n: usize,
) -> Vec<Vec<u32>> {
    let dev = Device::Cpu;
    let b = ids.dim(0).expect("batch");
    let p = prefix.geometry.num_virtual_tokens;
    let mut mc = prefix_cache(model, prefix, b, true);
    let enc = model.encode(ids, pad).expect("encode");
    let mut next = Tensor::full(model.decoder_start_token_id(), (b, 1), &dev).expect("start");
    let mut seen = 0;
    let mut out = vec![vec![]; b];
    for _ in 0..n {
        seen += 1;
        let ones = Tensor::ones((b, seen), DType::F32, &dev).expect("mask");
        let mask = extend_mask(&ones, p).expect("mask");
        mc.next_step();
        let logits = model
            .forward(
                &next,
                &mut Forward {
                    cache: &mut mc,
                    mask: &mask,
                    encoder: Some(&enc),
                    last_only: false,
                },
            )
            .expect("decode step");
        let tok = logits
            .narrow(1, 0, 1)
            .and_then(|l| l.squeeze(1))
            .and_then(|l| l.argmax(D::Minus1))
            .expect("argmax");
        for (row, t) in tok
            .to_vec1::<u32>()
            .expect("tokens")
            .into_iter()
            .enumerate()
        {
            out[row].push(t);
        }
        next = tok.unsqueeze(1).expect("next");
    }
    out
}

fn reference(exp: &Expected, values: &[f32]) -> Tensor {
    Tensor::from_vec(values.to_vec(), exp.logits_shape.clone(), &Device::Cpu)
        .expect("reference logits")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// Max abs difference over the positions where `mask` is 1 (`[B, S, V]` logits).
fn max_abs_diff_where(a: &Tensor, b: &Tensor, mask: &[Vec<u32>], want: u32) -> f32 {
    let mut worst = 0f32;
    for (r, row) in mask.iter().enumerate() {
        for (s, &m) in row.iter().enumerate() {
            if m == want {
                let x = a.get(r).and_then(|t| t.get(s)).expect("row");
                let y = b.get(r).and_then(|t| t.get(s)).expect("row");
                worst = worst.max(max_abs_diff(&x, &y));
            }
        }
    }
    worst
}

/// Our logits `[B, S, V]` and greedy tokens for a fixture, computed the way PEFT runs
/// it: T5 with the self-attention prefix only; causal models through the public API
/// (`forward_logits` for an all-ones mask, `greedy` with the padding mask).
fn ours(exp: &Expected, model: &dyn Model, prefix: &PrefixEncoder) -> (Tensor, Vec<Vec<u32>>) {
    let gr = exp.greedy.as_ref().expect("greedy reference");
    let input = ids(&exp.input_ids);
    let pad = ids(&exp.attention_mask).to_dtype(DType::F32).expect("pad");
    let padded = exp.attention_mask.iter().flatten().any(|&m| m == 0);
    match &exp.decoder_input_ids {
        Some(dec) => {
            let dec = ids(dec);
            let logits = forward(model, prefix, &input, &pad, Some(&dec), true);
            let tokens = greedy_t5_self_only(model, prefix, &input, &pad, gr.max_new_tokens);
            (logits, tokens)
        }
        None => {
            let logits = if padded {
                forward(model, prefix, &input, &pad, None, false)
            } else {
                forward_logits(
                    model,
                    Some(prefix),
                    &CacheConfig::new(CacheMode::Dynamic),
                    &input,
                    None,
                )
                .expect("forward_logits")
                .0
            };
            let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), gr.max_new_tokens);
            let out = greedy(model, Some(prefix), &opts, &input, Some(&pad)).expect("greedy");
            (logits, out.tokens)
        }
    }
}

/// Run one fixture: load through the cache, compare logits and greedy tokens.
fn parity(case: &str) {
    let exp = expected(case);
    assert!(
        exp.reference_error.is_none(),
        "{case}: the reference failed"
    );
    let cache = cache_for(&exp);
    let (model, prefix) = load_case(&exp, cache.path());
    let gr = exp.greedy.as_ref().expect("greedy reference");
    let padded = exp.attention_mask.iter().flatten().any(|&m| m == 0);
    // Left padding: the engine derives position ids from the padding mask, as
    // transformers' generate() does; the matching reference is PEFT's forward given those
    // position ids. (PEFT's forward without them keeps positions P.. on every row: the
    // ignored test `left_padding_against_peft_forward_without_position_ids`.)
    let (theirs, want_tokens) = if padded {
        (
            reference(
                &exp,
                exp.logits_mask_positions
                    .as_ref()
                    .expect("mask-position logits"),
            ),
            gr.tokens_mask_positions
                .as_ref()
                .expect("mask-position tokens"),
        )
    } else {
        (reference(&exp, &exp.logits), &gr.tokens)
    };
    let (logits, tokens) = ours(&exp, model.as_ref(), &prefix);
    assert_eq!(
        logits.dims(),
        exp.logits_shape.as_slice(),
        "{case}: logits shape"
    );
    let f32_note = exp
        .float32_error
        .map(|e| format!(" (the reference's own float32 error: {e:.1e})"))
        .unwrap_or_default();
    let diff = if padded {
        // Padding positions are excluded: their position ids are a convention
        // (transformers 0 + P, the engine 1) and their outputs are never used.
        let real = max_abs_diff_where(&logits, &theirs, &exp.attention_mask, 1);
        let pads = max_abs_diff_where(&logits, &theirs, &exp.attention_mask, 0);
        println!(
            "{case}: max abs logit diff {real:e} on real tokens{f32_note}; {pads:e} on padding \
             positions (not compared)"
        );
        real
    } else {
        let d = max_abs_diff(&logits, &theirs);
        println!("{case}: max abs logit diff {d:e}{f32_note}");
        d
    };
    println!(
        "{case}: greedy {tokens:?} (reference {want_tokens:?}, smallest top-2 margin {:.3e})",
        gr.min_top2_margin
    );
    if let Some(dec) = &exp.decoder_input_ids {
        // For the record: the engine's default keeps the cross-attention prefix.
        let input = ids(&exp.input_ids);
        let pad = ids(&exp.attention_mask).to_dtype(DType::F32).expect("pad");
        let with_cross = forward(
            model.as_ref(),
            &prefix,
            &input,
            &pad,
            Some(&ids(dec)),
            false,
        );
        println!(
            "{case}: with the cross-attention prefix kept (the engine's default) the max abs \
             diff would be {:e}: PEFT 0.21.2 drops it",
            max_abs_diff(&with_cross, &theirs)
        );
    }
    assert!(diff <= TOL, "{case}: max abs logit diff {diff:e} > {TOL:e}");
    assert_eq!(&tokens, want_tokens, "{case}: greedy tokens");

    // The model alone (no prefix) against transformers' generate(), where that call used
    // the positions we use (no padding).
    if !padded {
        let input = ids(&exp.input_ids);
        let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), gr.max_new_tokens);
        let base = greedy(model.as_ref(), None, &opts, &input, None).expect("greedy");
        assert_eq!(
            base.tokens, gr.no_prefix_tokens,
            "{case}: greedy without prefix"
        );
    }
    if gr.peft_generate_tokens != gr.tokens {
        println!(
            "{case}: note: PeftModel.generate() returned {:?} on this stack (prefix dropped)",
            gr.peft_generate_tokens
        );
    }
}

// ---------------------------------------------------------------------------------
// One test per fixture
// ---------------------------------------------------------------------------------

#[test]
fn gpt2() {
    parity("gpt2");
}

#[test]
fn gpt2_projection() {
    parity("gpt2-proj");
}

#[test]
fn gpt2_left_padded() {
    parity("gpt2-leftpad");
}

#[test]
fn llama_gqa_head_dim() {
    parity("llama-gqa");
}

#[test]
fn llama_gqa_projection() {
    parity("llama-gqa-proj");
}

#[test]
fn llama_gqa_left_padded() {
    parity("llama-gqa-leftpad");
}

#[test]
fn bloom() {
    parity("bloom");
}

#[test]
fn gpt_bigcode_multi_query() {
    parity("gpt_bigcode");
}

#[test]
fn t5_d_kv() {
    parity("t5-dkv");
}

#[test]
fn t5_d_kv_projection() {
    parity("t5-dkv-proj");
}

/// T5 v1.1 / FLAN-T5 (gated-gelu) as transformers 5.24 saves it: `tie_word_embeddings:
/// true` (no `lm_head.weight` in the file) and `scale_decoder_outputs: false`. The
/// engine's T5 config does not read `scale_decoder_outputs` and scales the tied head's
/// input by d_model^-0.5, so every logit is off by that factor (greedy tokens agree:
/// argmax does not change under a positive scale). The test also prints the difference
/// with that factor undone.
#[test]
fn t5_v1_1_unscaled_tied_head() {
    let exp = expected("t5-v1_1");
    let cache = cache_for(&exp);
    let (model, prefix) = load_case(&exp, cache.path());
    let theirs = reference(&exp, &exp.logits);
    let (logits, tokens) = ours(&exp, model.as_ref(), &prefix);
    let diff = max_abs_diff(&logits, &theirs);
    let d_model = model.geometry().hidden_size as f64;
    let unscaled = (&logits * d_model.sqrt()).expect("rescale");
    println!(
        "t5-v1_1: max abs logit diff {diff:e}; with the d_model^-0.5 scaling undone {:e}; \
         greedy {tokens:?} (reference {:?})",
        max_abs_diff(&unscaled, &theirs),
        exp.greedy.as_ref().expect("greedy").tokens
    );
    assert!(
        diff <= TOL,
        "t5-v1_1: max abs logit diff {diff:e} > {TOL:e}"
    );
}

/// PEFT's default T5 adapter (token_dim from d_model: head_dim 8 instead of d_kv 12)
/// crashes transformers inside the cache; we diagnose it before running, and, run
/// unchecked, the engine fails with the same shape mismatch in the cache.
#[test]
fn t5_peft_default_token_dim_is_a_head_dim_diagnosis() {
    let exp = expected("t5-dkv-peft-default");
    let reference = exp.reference_error.as_deref().expect("the reference fails");
    assert!(
        reference.contains("Expected size 8 but got size 12"),
        "{reference}"
    );
    let cache = cache_for(&exp);
    let opts = HubOptions::with_cache_dir(cache.path());
    let source = ModelSource::hub(&format!("fixtures/{}", exp.model), None).expect("source");
    let (_, model, _) = hub::load_model_with(&source, &opts, &Device::Cpu).expect("model");
    let dir = fixtures().join(&exp.case).join("adapter");
    let err = load_for(&dir, &model.geometry(), &Device::Cpu).expect_err("head_dim mismatch");
    let d = err
        .diagnosis()
        .unwrap_or_else(|| panic!("a diagnosis, got {err}"));
    assert_eq!(d.class, DiagnosisClass::HeadDim, "{err}");
    println!("ours: {err}\nPEFT + transformers: {reference}");

    // Unchecked, as PEFT runs it: the failure moves into the cache, as in transformers.
    let a = adapter::load(&dir, &Device::Cpu).expect("adapter");
    let prefix = a.prefix_encoder_unchecked().expect("unchecked prefix");
    let input = ids(&exp.input_ids);
    let pad = ids(&exp.attention_mask).to_dtype(DType::F32).expect("pad");
    let dec = ids(exp.decoder_input_ids.as_ref().expect("decoder ids"));
    let b = input.dim(0).expect("batch");
    let mut mc = prefix_cache(model.as_ref(), &prefix, b, true);
    let enc = model.encode(&input, &pad).expect("encode");
    let mask = extend_mask(
        &Tensor::ones((b, dec.dim(1).expect("len")), DType::F32, &Device::Cpu).expect("mask"),
        prefix.geometry.num_virtual_tokens,
    )
    .expect("mask");
    mc.next_step();
    let err = model
        .forward(
            &dec,
            &mut Forward {
                cache: &mut mc,
                mask: &mask,
                encoder: Some(&enc),
                last_only: false,
            },
        )
        .expect_err("the prefix does not fit the cache");
    let d = err
        .diagnosis()
        .unwrap_or_else(|| panic!("a diagnosis, got {err}"));
    println!("unchecked run: {err}");
    assert_eq!(d.class, DiagnosisClass::HeadDim, "{err}");
}

/// Left padding against PEFT's forward pass WITHOUT position ids: transformers then uses
/// positions P..P+S on every row, so a left-padded row's real tokens sit at positions
/// shifted by its padding. The engine derives positions from the padding mask (as
/// transformers' `generate()` does, which the parity tests compare with), so padded
/// rows differ from this reference by design; unpadded rows must still match.
#[test]
#[ignore = "convention difference: PEFT's forward without position_ids does not shift \
            left-padded rows, the engine derives positions from the mask like generate(); \
            run with --ignored to print the measured difference"]
fn left_padding_against_peft_forward_without_position_ids() {
    let mut failures = vec![];
    for case in ["gpt2-leftpad", "llama-gqa-leftpad"] {
        let exp = expected(case);
        let cache = cache_for(&exp);
        let (model, prefix) = load_case(&exp, cache.path());
        let theirs = reference(&exp, &exp.logits);
        let (logits, tokens) = ours(&exp, model.as_ref(), &prefix);
        let gr = exp.greedy.as_ref().expect("greedy");
        for (r, row) in exp.attention_mask.iter().enumerate() {
            let one = vec![row.clone()];
            let (a, b) = (
                logits.narrow(0, r, 1).expect("row"),
                theirs.narrow(0, r, 1).expect("row"),
            );
            let real = max_abs_diff_where(&a, &b, &one, 1);
            let padding = row.iter().filter(|&&m| m == 0).count();
            println!(
                "{case} row {r} ({padding} padding): max abs logit diff {real:e} on real tokens; \
                 greedy ours {:?} vs PEFT forward {:?}",
                tokens[r], gr.tokens[r]
            );
            if real > TOL || tokens[r] != gr.tokens[r] {
                failures.push(format!("{case} row {r}: {real:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "differ: {failures:?}");
}

// ---------------------------------------------------------------------------------
// hub.rs: resolution and loading errors
// ---------------------------------------------------------------------------------

fn probe_logits(model: &dyn Model) -> Tensor {
    model
        .forward(
            &ids(&[vec![5, 6, 7]]),
            &mut Forward {
                cache: &mut ModelCache::new(
                    CacheConfig::new(CacheMode::Dynamic),
                    model.family().legacy_layout(),
                    model.geometry().num_layers,
                    false,
                ),
                mask: &Tensor::ones((1, 3), DType::F32, &Device::Cpu).expect("mask"),
                encoder: None,
                last_only: false,
            },
        )
        .expect("forward")
}

#[test]
fn local_folder_and_hub_cache_give_the_same_model() {
    let dev = Device::Cpu;
    let folder = fixtures().join("models/gpt2");
    let (cfg_a, a, tok) = hub::load_model(&ModelSource::path(&folder), &dev).expect("folder");
    assert!(tok.is_none());
    let cache = TempDir::new("same");
    add_repo(cache.path(), "fixtures/gpt2", &folder, RefStyle::Plain);
    let opts = HubOptions::with_cache_dir(cache.path());
    let src = ModelSource::hub("fixtures/gpt2", Some("main")).expect("source");
    let files = src.resolve(&opts).expect("resolve");
    assert!(files
        .dir
        .ends_with(format!("snapshots/{}", commit_of("fixtures/gpt2"))));
    assert_eq!(files.weights, vec![files.dir.join(hub::WEIGHTS_FILE)]);
    let (cfg_b, b, _) = hub::load_model_with(&src, &opts, &dev).expect("hub");
    assert_eq!(cfg_a, cfg_b);
    assert_eq!(
        max_abs_diff(&probe_logits(a.as_ref()), &probe_logits(b.as_ref())),
        0.0
    );
}

#[test]
fn refs_with_a_newline_and_commit_hash_revisions_resolve() {
    let folder = fixtures().join("models/gpt2");
    let cache = TempDir::new("refs");
    add_repo(cache.path(), "org/newline", &folder, RefStyle::Newline);
    let commit = add_repo(cache.path(), "org/noref", &folder, RefStyle::None);
    let opts = HubOptions::with_cache_dir(cache.path());
    let nl = ModelSource::hub("org/newline", None).expect("source");
    assert!(nl.resolve(&opts).is_ok(), "trailing newline in refs/main");
    let by_hash = ModelSource::hub("org/noref", Some(&commit)).expect("source");
    assert!(by_hash
        .resolve(&opts)
        .expect("commit revision")
        .dir
        .ends_with(&commit));
    // Without a ref, `main` is not cached.
    let err = ModelSource::hub("org/noref", None)
        .expect("source")
        .resolve(&opts)
        .expect_err("no ref");
    assert!(err.to_string().contains("refs/main"), "{err}");

    // A ref whose snapshot is gone (a partial or moved cache).
    let repo = cache.path().join("models--org--newline");
    std::fs::remove_dir_all(repo.join("snapshots")).expect("rm snapshots");
    let err = nl.resolve(&opts).expect_err("snapshot missing");
    assert!(
        err.to_string().contains("names a snapshot that is missing"),
        "{err}"
    );

    // A snapshot without the weights: the error names the snapshot and the file.
    let commit = add_repo(cache.path(), "org/partial", &folder, RefStyle::Plain);
    let snap = cache
        .path()
        .join("models--org--partial/snapshots")
        .join(&commit);
    std::fs::remove_file(snap.join(hub::WEIGHTS_FILE)).expect("rm weights");
    let err = ModelSource::hub("org/partial", None)
        .expect("source")
        .resolve(&opts)
        .expect_err("no weights");
    let msg = err.to_string();
    assert!(
        msg.contains(&snap.join(hub::WEIGHTS_FILE).display().to_string()),
        "{msg}"
    );
}

#[test]
fn a_repository_that_is_not_cached_names_the_paths_and_how_to_fetch_it() {
    let cache = TempDir::new("missing");
    let opts = HubOptions::with_cache_dir(cache.path());
    let err = ModelSource::hub("org/absent", Some("v2"))
        .expect("source")
        .resolve(&opts)
        .expect_err("not cached");
    let msg = err.to_string();
    println!("{msg}");
    for want in [
        "hub org/absent@v2",
        "models--org--absent/refs/v2",
        &cache.path().display().to_string(),
        "huggingface-cli download org/absent --revision v2",
        "never downloads",
        "model: {path: DIR}",
    ] {
        assert!(msg.contains(want), "missing `{want}` in: {msg}");
    }

    // The repository is there, the revision is not: the ref and snapshot paths searched
    // and what is cached.
    add_repo(
        cache.path(),
        "org/present",
        &fixtures().join("models/gpt2"),
        RefStyle::Plain,
    );
    let err = ModelSource::hub("org/present", Some("v2"))
        .expect("source")
        .resolve(&opts)
        .expect_err("no such revision");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("models--org--present/refs/v2")
            && msg.contains("snapshots/<commit>/config.json"),
        "{msg}"
    );
    assert!(msg.contains("cached refs: main"), "{msg}");

    // A cache folder that does not exist at all.
    let opts = HubOptions::with_cache_dir(cache.path().join("nope"));
    let err = ModelSource::hub("org/x", None)
        .expect("source")
        .resolve(&opts)
        .expect_err("no cache");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// Copy a fixture model folder into a fresh temporary folder to break it.
fn model_copy(tag: &str, model: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for e in std::fs::read_dir(fixtures().join("models").join(model)).expect("list") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match hub::load_model(&ModelSource::path(dir), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_folders_give_clear_errors() {
    // Truncated and corrupt weights name the file.
    let dir = model_copy("trunc", "gpt2");
    let w = dir.path().join(hub::WEIGHTS_FILE);
    let bytes = std::fs::read(&w).expect("read");
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&w, &bytes[..cut]).expect("truncate");
        let msg = load_err(dir.path());
        assert!(
            msg.contains(&w.display().to_string()) && msg.contains("safetensors"),
            "{msg}"
        );
    }
    let mut bad = bytes.clone();
    bad[9] = b'!';
    std::fs::write(&w, &bad).expect("corrupt");
    assert!(load_err(dir.path()).contains("not a valid safetensors file"));

    // No weights; pickle weights only.
    std::fs::remove_file(&w).expect("rm");
    let msg = load_err(dir.path());
    assert!(
        msg.contains(hub::WEIGHTS_FILE) && msg.contains("config.json"),
        "{msg}"
    );
    std::fs::write(dir.path().join(hub::PICKLE_WEIGHTS_FILE), b"pickle").expect("bin");
    assert!(load_err(dir.path()).contains("only safetensors"));

    // Unsupported model_type lists the supported families.
    let dir = model_copy("mt", "gpt2");
    let c = dir.path().join(hub::CONFIG_FILE);
    let text = std::fs::read_to_string(&c).expect("config");
    std::fs::write(&c, text.replace("\"gpt2\"", "\"mamba\"")).expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("mamba")
            && msg.contains("gpt2, llama, bloom, gpt_bigcode, t5, qwen2, mistral, qwen3"),
        "{msg}"
    );
    assert!(msg.contains(&c.display().to_string()), "{msg}");

    // No config.json; no folder.
    std::fs::remove_file(&c).expect("rm");
    assert!(load_err(dir.path()).contains("no config.json"));
    assert!(load_err(&dir.path().join("absent")).contains("not found"));

    // Weights of another model: the missing tensor is named.
    let dir = model_copy("other", "gpt2");
    std::fs::copy(
        fixtures().join("models/bloom").join(hub::WEIGHTS_FILE),
        dir.path().join(hub::WEIGHTS_FILE),
    )
    .expect("copy");
    let msg = load_err(dir.path());
    assert!(msg.contains("wte") || msg.contains("transformer"), "{msg}");
}

#[test]
fn sharded_checkpoints_load_like_one_file() {
    let dev = Device::Cpu;
    let src = fixtures().join("models/llama-gqa");
    let dir = TempDir::new("shards");
    std::fs::copy(
        src.join(hub::CONFIG_FILE),
        dir.path().join(hub::CONFIG_FILE),
    )
    .expect("config");
    let all = candle_core::safetensors::load(src.join(hub::WEIGHTS_FILE), &dev).expect("weights");
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: Vec<(String, Tensor)> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        adapter::save_safetensors(&dir.path().join(shard), &tensors).expect("shard");
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.path().join(hub::WEIGHTS_INDEX_FILE), index.to_string()).expect("index");
    let source = ModelSource::path(dir.path());
    let files = source
        .resolve(&HubOptions::with_cache_dir(""))
        .expect("resolve");
    assert_eq!(files.weights.len(), 2);
    let (_, sharded, _) = hub::load_model(&source, &dev).expect("sharded");
    let (_, single, _) = hub::load_model(&ModelSource::path(&src), &dev).expect("single");
    assert_eq!(
        max_abs_diff(
            &probe_logits(sharded.as_ref()),
            &probe_logits(single.as_ref())
        ),
        0.0
    );

    // A shard the index names but that is missing.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn a_folder_with_tokenizer_json_loads_it() {
    let dir = model_copy("tok", "gpt2");
    std::fs::write(
        dir.path().join(hub::TOKENIZER_FILE),
        prefix_harness::tokenizer::BUILTIN_JSON,
    )
    .expect("tokenizer");
    let (_, _, tok) = hub::load_model(&ModelSource::path(dir.path()), &Device::Cpu).expect("load");
    let tok = tok.expect("tokenizer loaded");
    assert_eq!(tok.encode("hi").expect("encode"), vec![104, 105]);
    std::fs::write(dir.path().join(hub::TOKENIZER_FILE), "{").expect("broken");
    assert!(load_err(dir.path()).contains("tokenizer.json"));
}
