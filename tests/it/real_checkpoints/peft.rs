//! Our forward pass and greedy decoding, PEFT-style, against each fixture's `expected.json`.

use super::*;
use crate::common::{max_abs_diff, pass, prefix_cache};
use prefix_harness::engine::model::Ops;

/// Logits `[B, S, V]` of one forward pass as PEFT's `forward` computes them, and the
/// cache after it: the padding mask `pad: [B, S]` extended by P ones; for T5 the encoder
/// reads `ids: [B, S]` with `pad`, the decoder `dec: [B, T]` (then `S` = `T` in the
/// logits), `self_only` drops the cross prefix and the cache is `dynamic`; a causal
/// model's cache is built by `generate::prepare_cache` in `mode` (the hybrid cache's
/// layer windows from the model, as the engine builds it).
fn forward(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    ids: &Tensor,
    pad: &Tensor,
    dec: Option<&Tensor>,
    self_only: bool,
    mode: CacheMode,
) -> (Tensor, ModelCache) {
    let b = ids.dim(0).expect("batch");
    let p = prefix.geometry.num_virtual_tokens;
    let (input, encoded, mask, mut mc) = match dec {
        Some(dec) => {
            assert_eq!(mode, CacheMode::Dynamic, "encoder-decoders: dynamic only");
            let enc = model.encode(ids, pad, Ops::Kernels).expect("encode");
            let t = dec.dim(1).expect("decoder length");
            let ones = Tensor::ones((b, t), DType::F32, &Device::Cpu).expect("mask");
            let mc = prefix_cache(model, prefix, b, self_only);
            (
                dec.clone(),
                Some(enc),
                extend_mask(&ones, p).expect("mask"),
                mc,
            )
        }
        None => {
            let mc = prepare_cache(
                model,
                Some(prefix),
                &CacheConfig::new(mode),
                PrefixLayout::Auto,
                b,
            )
            .expect("prefix cache");
            (ids.clone(), None, extend_mask(pad, p).expect("mask"), mc)
        }
    };
    mc.next_step();
    let logits = pass(model, &input, &mut mc, &mask, encoded.as_ref()).expect("forward");
    (logits, mc)
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
    let enc = model.encode(ids, pad, Ops::Kernels).expect("encode");
    let mut next = Tensor::full(model.decoder_start_token_id(), (b, 1), &dev).expect("start");
    let mut seen = 0;
    let mut out = vec![vec![]; b];
    for _ in 0..n {
        seen += 1;
        let ones = Tensor::ones((b, seen), DType::F32, &dev).expect("mask");
        let mask = extend_mask(&ones, p).expect("mask");
        mc.next_step();
        let logits = pass(model, &next, &mut mc, &mask, Some(&enc)).expect("decode step");
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

/// What the engine computes for a fixture in one cache mode.
struct Ours {
    /// `[B, S, V]` (`S`: the decoder length for T5).
    logits: Tensor,
    /// Greedy tokens `[B][max_new_tokens]`.
    tokens: Vec<Vec<u32>>,
    /// The cache after the forward pass that gave `logits` (the prefill).
    cache: ModelCache,
}

/// Our logits and greedy tokens for a fixture, computed the way PEFT runs it, with the
/// cache in `mode`: T5 with the self-attention prefix only (`dynamic`); causal models
/// through the public API (`forward_logits` for an all-ones mask, `greedy` with the
/// padding mask).
fn ours(exp: &Expected, model: &dyn Model, prefix: &PrefixEncoder, mode: CacheMode) -> Ours {
    let gr = exp.greedy.as_ref().expect("greedy reference");
    let input = ids(&exp.input_ids);
    let pad = ids(&exp.attention_mask).to_dtype(DType::F32).expect("pad");
    let padded = exp.attention_mask.iter().flatten().any(|&m| m == 0);
    match &exp.decoder_input_ids {
        Some(dec) => {
            let dec = ids(dec);
            let (logits, cache) = forward(model, prefix, &input, &pad, Some(&dec), true, mode);
            let tokens = greedy_t5_self_only(model, prefix, &input, &pad, gr.max_new_tokens);
            Ours {
                logits,
                tokens,
                cache,
            }
        }
        None => {
            let (logits, cache) = if padded {
                forward(model, prefix, &input, &pad, None, false, mode)
            } else {
                forward_logits(
                    model,
                    Some(prefix),
                    &CacheConfig::new(mode),
                    Ops::Kernels,
                    &input,
                    None,
                )
                .expect("forward_logits")
            };
            let opts = DecodeOptions::new(CacheConfig::new(mode), gr.max_new_tokens);
            let out = greedy(model, Some(prefix), &opts, &input, Some(&pad)).expect("greedy");
            Ours {
                logits,
                tokens: out.tokens,
                cache,
            }
        }
    }
}

/// Run one fixture in the `dynamic` cache (what PEFT's `DynamicCache` is).
fn parity(case: &str) {
    parity_in(case, &[CacheMode::Dynamic]);
}

/// Run one fixture: load it through the Hugging Face cache, then in each cache mode of
/// `modes` compare the logits (<= [`TOL`], printed) and the greedy tokens (exact), and
/// the tokens without prefix with transformers' `generate()` (unpadded cases). In
/// `modes[0]`, the mode whose stores are those of the reference's cache, the stored key
/// shapes after the prefill must also be the reference's (`cache_after_prefill`, when
/// the fixture records it).
pub(super) fn parity_in(case: &str, modes: &[CacheMode]) {
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
    let f32_note = exp
        .float32_error
        .map(|e| format!(" (the reference's own float32 error: {e:.1e})"))
        .unwrap_or_default();
    for (i, &mode) in modes.iter().enumerate() {
        let Ours {
            logits,
            tokens,
            cache: after_prefill,
        } = ours(&exp, model.as_ref(), &prefix, mode);
        assert_eq!(
            logits.dims(),
            exp.logits_shape.as_slice(),
            "{case} [{mode:?}]: logits shape"
        );
        let diff = if padded {
            // Padding positions are excluded: their position ids are a convention
            // (transformers 0 + P, the engine 1) and their outputs are never used.
            let real = max_abs_diff_where(&logits, &theirs, &exp.attention_mask, 1);
            let pads = max_abs_diff_where(&logits, &theirs, &exp.attention_mask, 0);
            println!(
                "{case} [{mode:?}]: max abs logit diff {real:e} on real tokens{f32_note}; \
                 {pads:e} on padding positions (not compared)"
            );
            real
        } else {
            let d = max_abs_diff(&logits, &theirs);
            println!("{case} [{mode:?}]: max abs logit diff {d:e}{f32_note}");
            d
        };
        println!(
            "{case} [{mode:?}]: greedy {tokens:?} (reference {want_tokens:?}, smallest top-2 \
             margin {:.3e})",
            gr.min_top2_margin
        );
        if let (Some(dec), 0) = (&exp.decoder_input_ids, i) {
            // For the record: the engine's default keeps the cross-attention prefix.
            let input = ids(&exp.input_ids);
            let pad = ids(&exp.attention_mask).to_dtype(DType::F32).expect("pad");
            let (with_cross, _) = forward(
                model.as_ref(),
                &prefix,
                &input,
                &pad,
                Some(&ids(dec)),
                false,
                CacheMode::Dynamic,
            );
            println!(
                "{case}: with the cross-attention prefix kept (the engine's default) the max \
                 abs diff would be {:e}: PEFT 0.21.2 drops it",
                max_abs_diff(&with_cross, &theirs)
            );
        }
        assert!(
            diff <= TOL,
            "{case} [{mode:?}]: max abs logit diff {diff:e} > {TOL:e}"
        );
        assert_eq!(&tokens, want_tokens, "{case} [{mode:?}]: greedy tokens");

        // What the reference's cache stores after the prefill, layer by layer.
        if let (Some(layers), 0) = (&exp.cache_after_prefill, i) {
            let stored: Vec<_> = (0..layers.len())
                .map(|l| after_prefill.stored_key_shape(l).unwrap_or_default())
                .collect();
            let want: Vec<_> = layers.iter().map(|l| l.key_shape.clone()).collect();
            let classes: Vec<_> = layers.iter().map(|l| l.layer.as_str()).collect();
            println!("{case} [{mode:?}]: stored keys {stored:?} (reference {classes:?} {want:?})");
            assert_eq!(stored, want, "{case} [{mode:?}]: stored key shapes");
        }

        // The model alone (no prefix) against transformers' generate(), where that call
        // used the positions we use (no padding).
        if !padded {
            let input = ids(&exp.input_ids);
            let opts = DecodeOptions::new(CacheConfig::new(mode), gr.max_new_tokens);
            let base = greedy(model.as_ref(), None, &opts, &input, None).expect("greedy");
            assert_eq!(
                base.tokens, gr.no_prefix_tokens,
                "{case} [{mode:?}]: greedy without prefix"
            );
        }
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
    let Ours { logits, tokens, .. } = ours(&exp, model.as_ref(), &prefix, CacheMode::Dynamic);
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
    let enc = model.encode(&input, &pad, Ops::Kernels).expect("encode");
    let mask = extend_mask(
        &Tensor::ones((b, dec.dim(1).expect("len")), DType::F32, &Device::Cpu).expect("mask"),
        prefix.geometry.num_virtual_tokens,
    )
    .expect("mask");
    mc.next_step();
    let err = pass(model.as_ref(), &dec, &mut mc, &mask, Some(&enc))
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
        let Ours { logits, tokens, .. } = ours(&exp, model.as_ref(), &prefix, CacheMode::Dynamic);
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
