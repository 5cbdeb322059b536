//! Generation strategies with a prefix, in every cache mode and family: greedy,
//! beam search (the prefix expanded to batch x beams and reordered with the beams),
//! seeded sampling, EOS, `num_return_sequences`, left-padded batches, and
//! `ModelCache::reorder` in every layout.

use crate::common::*;
use candle_core::{Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode, Layout, ModelCache};
use prefix_harness::engine::diagnosis::{Attention, DiagnosisClass};
use prefix_harness::engine::generate::{greedy, DecodeOptions, DecodeOutput, Generation, Strategy};
use prefix_harness::engine::model::{Family, Model};
use prefix_harness::engine::trace::CacheOp;
use rstest::rstest;

const PROMPT: usize = 6;
const STEPS: usize = 6;
const P: usize = 4;
const WINDOW: usize = 8;

fn mode(name: &str) -> CacheMode {
    crate::common::cache_mode(name, 64, WINDOW)
}

/// The recompute reference of `cfg`: cache `none` with the same attention window.
fn reference(cfg: &CacheConfig) -> CacheConfig {
    let mut r = CacheConfig::new(CacheMode::None);
    r.window = cfg.window;
    r
}

/// A left-padded batch: row r starts with `2 r` padding positions (id 0, mask 0).
/// `([B, S] u32, [B, S] f32)`
fn padded_batch(batch: usize) -> (Tensor, Tensor) {
    let ids = prompt(batch, PROMPT).to_vec2::<u32>().expect("ids");
    let mut data = vec![];
    let mut mask = vec![];
    for (r, row) in ids.iter().enumerate() {
        let pad = (2 * r).min(PROMPT - 1);
        for (i, t) in row.iter().enumerate() {
            data.push(if i < pad { 0 } else { *t });
            mask.push(if i < pad { 0f32 } else { 1.0 });
        }
    }
    (
        Tensor::from_vec(data, (batch, PROMPT), &Device::Cpu).expect("ids"),
        Tensor::from_vec(mask, (batch, PROMPT), &Device::Cpu).expect("mask"),
    )
}

fn run(model: &dyn Model, opts: &DecodeOptions, batch: usize) -> DecodeOutput {
    let prefix = prefix(model, P);
    let (ids, mask) = padded_batch(batch);
    Generation {
        model,
        prefix: Some(&prefix),
        opts,
        ids: &ids,
        pad: Some(&mask),
    }
    .generate()
    .unwrap_or_else(|e| panic!("{:?}/{}: {e}", model.family(), opts.cache.mode.name()))
}

fn beam(num_beams: usize) -> Strategy {
    Strategy::Beam {
        num_beams,
        length_penalty: 1.0,
        early_stopping: false,
    }
}

fn sample(seed: u64) -> Strategy {
    Strategy::Sample {
        temperature: 1.0,
        top_k: Some(50),
        top_p: Some(0.95),
        seed,
    }
}

/// Rows a stored tensor's dimension 0 holds per batch row in `layout`.
fn rows_per_batch(layout: Layout, kv_heads: usize) -> usize {
    match layout {
        Layout::BloomLegacy => kv_heads,
        _ => 1,
    }
}

family_test!(
    CLASSIC,
    greedy_in_every_cache_mode_equals_recompute,
    |family: Family,
     #[values("none", "dynamic", "static", "sliding", "legacy")] mode_name: &str| {
        let model = tiny_model(family);
        let cfg = CacheConfig::new(mode(mode_name));
        let out = run(model.as_ref(), &DecodeOptions::new(cfg.clone(), STEPS), 2);
        let want = run(
            model.as_ref(),
            &DecodeOptions::new(reference(&cfg), STEPS),
            2,
        );
        assert_eq!(out.tokens.len(), 2);
        assert!(out.tokens.iter().all(|t| t.len() == STEPS));
        assert_eq!(out.tokens, want.tokens, "{family:?}/{mode_name}");
        assert!(out.scores.is_none());
    }
);

family_test!(
    CLASSIC,
    beam_search_with_one_beam_is_greedy,
    |family: Family| {
        let model = tiny_model(family);
        let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), STEPS);
        let g = run(model.as_ref(), &opts, 2);
        let b = run(model.as_ref(), &opts.clone().with_strategy(beam(1)), 2);
        assert_eq!(b.tokens, g.tokens, "{family:?}");
        // The same through `greedy`, which ignores the strategy.
        let (ids, mask) = padded_batch(2);
        let pre = prefix(model.as_ref(), P);
        let via = greedy(
            model.as_ref(),
            Some(&pre),
            &opts.clone().with_strategy(beam(3)),
            &ids,
            Some(&mask),
        )
        .expect("greedy");
        assert_eq!(via.tokens, g.tokens);
    }
);

family_test!(
    CLASSIC,
    four_beams_batch_two_in_every_cache_mode_match_recompute_and_keep_batch_x_beams,
    |family: Family,
     #[values("none", "dynamic", "static", "sliding", "legacy")] mode_name: &str| {
        const B: usize = 2;
        const K: usize = 4;
        let model = tiny_model(family);
        let g = model.geometry();
        let cfg = CacheConfig::new(mode(mode_name));
        let opts = DecodeOptions::new(cfg.clone(), STEPS).with_strategy(beam(K));
        let out = run(model.as_ref(), &opts, B);
        let want = run(
            model.as_ref(),
            &DecodeOptions::new(reference(&cfg), STEPS).with_strategy(beam(K)),
            B,
        );
        assert_eq!(out.tokens.len(), B, "one sequence per input row");
        assert!(out.tokens.iter().all(|t| t.len() == STEPS));
        assert_eq!(out.tokens, want.tokens, "{family:?}/{mode_name}");
        let (sa, sb) = (out.scores.expect("scores"), want.scores.expect("scores"));
        for (a, b) in sa.iter().zip(&sb) {
            assert!(
                (a - b).abs() < 1e-3,
                "{family:?}/{mode_name}: scores {sa:?} vs {sb:?}"
            );
        }
        assert!(out.logits.iter().all(|l| l.dims() == [B * K, g.vocab_size]));

        // The trace: the prefix entered the cache as B x K rows, every forward pass read
        // B x K rows, and from step 1 on every layer (self and cross) was reordered
        // before it was used.
        let layout = out.cache.layout;
        let group = rows_per_batch(layout, g.num_kv_heads);
        let trace = &out.cache.trace;
        let seeds: Vec<_> = trace
            .events
            .iter()
            .filter(|e| e.op == CacheOp::Seed)
            .collect();
        assert!(!seeds.is_empty());
        for e in seeds {
            let rows = match e.attention {
                Attention::SelfAttn => B * K * group,
                Attention::Cross => B * K,
            };
            assert_eq!(
                e.shapes.key_written.as_ref().map(|k| k[0]),
                Some(rows),
                "{e:?}"
            );
        }
        let last_step = trace.events.iter().map(|e| e.step).max().unwrap_or(0);
        assert_eq!(last_step, STEPS - 1);
        for step in 0..=last_step {
            for layer in 0..g.num_layers {
                let mut atts = vec![Attention::SelfAttn];
                if g.encoder_decoder {
                    atts.push(Attention::Cross);
                }
                for att in atts {
                    let at = |op: CacheOp| {
                        trace
                            .events
                            .iter()
                            .filter(|e| e.step == step && e.layer == layer && e.attention == att)
                            .filter(|e| e.op == op)
                            .collect::<Vec<_>>()
                    };
                    let used: Vec<_> = at(CacheOp::Update)
                        .into_iter()
                        .chain(at(CacheOp::Read))
                        .collect();
                    assert_eq!(used.len(), 1, "step {step} layer {layer} {att}");
                    assert_eq!(
                        used[0].key_read.as_ref().map(|k| k[0]),
                        Some(B * K),
                        "{family:?}/{mode_name} step {step} layer {layer} {att}: keys read"
                    );
                    let reorders = at(CacheOp::Reorder);
                    assert_eq!(reorders.len(), usize::from(step > 0), "step {step}");
                    let group = if att == Attention::Cross { 1 } else { group };
                    for e in reorders {
                        for shape in [&e.shapes.key_before, &e.shapes.key_after]
                            .into_iter()
                            .flatten()
                        {
                            assert_eq!(shape[0], B * K * group, "{e:?}");
                        }
                        assert_eq!(
                            e.shapes.key_before, e.shapes.key_after,
                            "a reorder keeps shapes"
                        );
                    }
                }
            }
        }
    }
);

family_test!(
    CLASSIC,
    two_return_sequences_of_four_beams_come_best_first,
    |family: Family| {
        let model = tiny_model(family);
        let base =
            DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), STEPS).with_strategy(beam(4));
        let best = run(model.as_ref(), &base, 2);
        let mut opts = base.clone();
        opts.request.num_return_sequences = 2;
        let out = run(model.as_ref(), &opts, 2);
        assert_eq!(out.tokens.len(), 4, "2 rows per input row");
        let scores = out.scores.expect("scores");
        assert_eq!(scores.len(), 4);
        for row in 0..2 {
            assert_eq!(out.tokens[2 * row], best.tokens[row], "best first");
            assert!(scores[2 * row] >= scores[2 * row + 1], "{scores:?}");
            assert_ne!(
                out.tokens[2 * row],
                out.tokens[2 * row + 1],
                "distinct hypotheses"
            );
        }
        // More return sequences than beams is a configuration error.
        opts.request.num_return_sequences = 5;
        let pre = prefix(model.as_ref(), P);
        let (ids, mask) = padded_batch(2);
        assert!(Generation {
            model: model.as_ref(),
            prefix: Some(&pre),
            opts: &opts,
            ids: &ids,
            pad: Some(&mask)
        }
        .generate()
        .is_err());
    }
);

family_test!(
    CLASSIC,
    seeded_sampling_is_reproducible_and_cache_independent,
    |family: Family| {
        let model = tiny_model(family);
        let opts = |m: &str, seed: u64| {
            let mut o =
                DecodeOptions::new(CacheConfig::new(mode(m)), STEPS).with_strategy(sample(seed));
            o.request.num_return_sequences = 2;
            o
        };
        let a = run(model.as_ref(), &opts("dynamic", 7), 2);
        assert_eq!(
            a.tokens.len(),
            4,
            "each input row repeated per return sequence"
        );
        assert!(a.tokens.iter().all(|t| t.len() == STEPS));
        let again = run(model.as_ref(), &opts("dynamic", 7), 2);
        assert_eq!(a.tokens, again.tokens, "same seed, same tokens");
        let other = run(model.as_ref(), &opts("dynamic", 8), 2);
        assert_ne!(a.tokens, other.tokens, "another seed, other tokens");
        for m in ["none", "static", "legacy"] {
            let o = run(model.as_ref(), &opts(m, 7), 2);
            assert_eq!(o.tokens, a.tokens, "{family:?}/{m}");
        }
        // Sliding: the same tokens as recompute with the same window.
        let s = run(model.as_ref(), &opts("sliding", 7), 2);
        let mut r = opts("none", 7);
        r.cache.window = Some(WINDOW);
        assert_eq!(
            s.tokens,
            run(model.as_ref(), &r, 2).tokens,
            "{family:?}/sliding"
        );
    }
);

family_test!(
    CLASSIC,
    a_row_that_emits_eos_stops,
    |family: Family, #[values("none", "dynamic", "legacy")] mode_name: &str| {
        let model = tiny_model(family);
        let base = DecodeOptions::new(CacheConfig::new(mode(mode_name)), STEPS);
        let free = run(model.as_ref(), &base, 3);
        let eos = free.tokens[0][0];
        // Neither EOS nor 1 (a constant a broken `pad_id` could return).
        let pad = if eos == 5 { 6 } else { 5 };
        let mut opts = base.clone();
        opts.request.eos_token_id = Some(eos);
        opts.request.pad_token_id = Some(pad);
        let out = run(model.as_ref(), &opts, 3);
        // Each row follows the free run up to its first EOS, then emits pad; generation
        // stops once every row is finished.
        let stop = |row: &Vec<u32>| row.iter().position(|t| *t == eos).map(|i| i + 1);
        let len = if free.tokens.iter().all(|r| stop(r).is_some()) {
            free.tokens.iter().filter_map(stop).max().unwrap_or(STEPS)
        } else {
            STEPS
        };
        assert_eq!(out.tokens[0][0], eos);
        for (got, free) in out.tokens.iter().zip(&free.tokens) {
            let cut = stop(free).unwrap_or(STEPS).min(len);
            let mut want = free[..cut].to_vec();
            want.resize(len, pad);
            assert_eq!(got, &want, "{family:?}/{mode_name}");
        }
        // A single row that finishes at once stops after one token.
        let pre = prefix(model.as_ref(), P);
        let (ids, mask) = padded_batch(1);
        let one = Generation {
            model: model.as_ref(),
            prefix: Some(&pre),
            opts: &opts,
            ids: &ids,
            pad: Some(&mask),
        }
        .generate()
        .expect("runs");
        assert_eq!(one.tokens, vec![vec![eos]]);
        assert_eq!(one.logits.len(), 1);

        // Beams with the same EOS agree with recompute and end rows with EOS + pad.
        let mut bopts = opts.clone().with_strategy(beam(4));
        bopts.request.num_return_sequences = 2;
        let b = run(model.as_ref(), &bopts, 2);
        let mut r = bopts.clone();
        r.cache = reference(&bopts.cache);
        assert_eq!(
            b.tokens,
            run(model.as_ref(), &r, 2).tokens,
            "{family:?}/{mode_name}"
        );
        for row in &b.tokens {
            if let Some(i) = row.iter().position(|t| *t == eos) {
                assert!(row[i + 1..].iter().all(|t| *t == pad), "{row:?}");
            }
        }
    }
);

// ---- ModelCache::reorder --------------------------------------------------------

const H: usize = 2;
const D: usize = 3;

/// `[b, h, s, d]` with values `1000 * row + 100 * tag + position in row`.
fn marked(b: usize, h: usize, s: usize, tag: usize) -> Tensor {
    let per = h * s * D;
    let data: Vec<f32> = (0..b * per)
        .map(|i| (1000 * (i / per) + 100 * tag + i % per) as f32)
        .collect();
    Tensor::from_vec(data, (b, h, s, D), &Device::Cpu).expect("tensor")
}

/// Row `i` of `after` (`[N', ...]`) is row `perm[i]` of `before` (`[N, ...]`).
fn assert_rows_permuted(before: &Tensor, after: &Tensor, perm: &[u32], what: &str) {
    assert_eq!(after.dim(0).unwrap(), perm.len(), "{what}: rows");
    for (i, src) in perm.iter().enumerate() {
        let a = after.get(i).unwrap();
        let b = before.get(*src as usize).unwrap();
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "{what}: row {i} should be row {src}"
        );
    }
}

/// Stored self keys and values of layer 0 in the standard layout.
fn standard(cache: &ModelCache, heads: usize) -> (Tensor, Tensor) {
    let (k, v) = cache.stored_self(0).expect("stored");
    cache
        .layout
        .to_standard(&k, &v, heads)
        .expect("to standard")
}

#[rstest]
#[case::dynamic(CacheMode::Dynamic, Layout::Standard, H)]
#[case::static_(CacheMode::Static { max_len: 32 }, Layout::Standard, H)]
#[case::sliding(CacheMode::Sliding { window: 16 }, Layout::Standard, H)]
#[case::none(CacheMode::None, Layout::Standard, H)]
#[case::legacy_standard(CacheMode::Legacy, Layout::Standard, H)]
#[case::legacy_bloom(CacheMode::Legacy, Layout::BloomLegacy, H)]
#[case::legacy_bigcode(CacheMode::Legacy, Layout::BigcodeFused, 1)]
fn reorder_permutes_the_batch_rows_of_every_layout(
    #[case] cache_mode: CacheMode,
    #[case] legacy: Layout,
    #[case] heads: usize,
) {
    let perm = [2u32, 0, 1];
    let cfg = CacheConfig::new(cache_mode);
    let mut cache = ModelCache::new(cfg, legacy, 2, true);
    cache.set_kv_heads(heads);
    let layout = cache.layout;
    let (pk, pv) = (marked(3, heads, 2, 1), marked(3, heads, 2, 2)); // [3, H, P=2, D]
    let (sk, sv) = layout.from_standard(&pk, &pv).expect("prefix layout");
    for layer in 0..2 {
        cache
            .seed(layer, Attention::SelfAttn, sk.clone(), sv.clone(), 2)
            .expect("seed");
        cache
            .seed(layer, Attention::Cross, pk.clone(), pv.clone(), 2)
            .expect("seed cross");
    }

    // The not-yet-merged prefix follows the permutation.
    cache.reorder(&perm).expect("reorder prefix");
    let (k, v) = standard(&cache, heads);
    assert_rows_permuted(&pk, &k, &perm, "prefix keys");
    assert_rows_permuted(&pv, &v, &perm, "prefix values");
    let (ck, _) = cache.stored_cross(1).expect("cross prefix");
    assert_rows_permuted(&pk, &ck, &perm, "cross prefix keys");

    // After a prefill: stored prefix + tokens, and the cross cache with encoder keys.
    let (nk, nv) = (marked(3, heads, 3, 3), marked(3, heads, 3, 4)); // [3, H, S=3, D]
    cache.next_step();
    let mut held = vec![];
    for layer in 0..2 {
        let view = cache.update_self(layer, &nk, &nv, (2, 5)).expect("update");
        assert_eq!(view.k.dims(), [3, heads, 5, D]);
        held.push((view.k, view.v));
        let (ek, ev) = (marked(3, heads, 4, 5), marked(3, heads, 4, 6));
        cache.cross(layer, || Ok((ek, ev))).expect("cross");
    }
    let before_self = standard(&cache, heads);
    let before_cross = cache.stored_cross(0).expect("cross kv");
    // `none` recomputes the cross keys every pass and keeps only the cross prefix.
    let cross_len = if cache_mode == CacheMode::None { 2 } else { 6 };
    assert_eq!(before_cross.0.dims(), [3, heads, cross_len, D]);
    cache.next_step();
    cache.reorder(&perm).expect("reorder");
    let after_self = standard(&cache, heads);
    assert_rows_permuted(&before_self.0, &after_self.0, &perm, "keys");
    assert_rows_permuted(&before_self.1, &after_self.1, &perm, "values");
    let after_cross = cache.stored_cross(0).expect("cross kv");
    assert_rows_permuted(&before_cross.0, &after_cross.0, &perm, "cross keys");
    assert_rows_permuted(&before_cross.1, &after_cross.1, &perm, "cross values");

    // One reorder event per layer and attention, shapes unchanged.
    let events: Vec<_> = cache
        .trace
        .events
        .iter()
        .filter(|e| e.op == CacheOp::Reorder && e.step == 1)
        .collect();
    assert_eq!(events.len(), 4);
    assert!(events
        .iter()
        .all(|e| e.shapes.key_before == e.shapes.key_after && e.shapes.key_after.is_some()));

    // The next step appends to the reordered rows (what the attention reads).
    let view = cache
        .update_self(0, &nk, &nv, (5, 8))
        .expect("update after reorder");
    let kept = if cache_mode == CacheMode::None { 2 } else { 5 };
    let read = view.k.narrow(2, 0, kept).unwrap();
    let old = held[0].0.narrow(2, 0, kept).unwrap();
    assert_rows_permuted(&old, &read, &perm, "keys read after reorder");

    // Repeated indices expand the batch (batch x beams); out-of-range rows are a
    // batch diagnosis.
    cache.reorder(&[0, 0, 1, 1, 2, 2]).expect("expand");
    let (k, _) = cache.stored_self(0).expect("stored");
    assert_eq!(k.dim(0).unwrap(), 6 * rows_per_batch(layout, heads));
    let err = cache.reorder(&[6]).expect_err("row 6 does not exist");
    assert_eq!(
        err.diagnosis().map(|d| d.class),
        Some(DiagnosisClass::Batch),
        "{err}"
    );
}

#[test]
fn a_bloom_legacy_reorder_needs_the_head_count() {
    let mut cache = ModelCache::new(
        CacheConfig::new(CacheMode::Legacy),
        Layout::BloomLegacy,
        1,
        false,
    );
    let (k, v) = Layout::BloomLegacy
        .from_standard(&marked(2, H, 2, 0), &marked(2, H, 2, 1))
        .unwrap();
    cache.seed(0, Attention::SelfAttn, k, v, 2).unwrap();
    assert!(cache.reorder(&[1, 0]).is_err());
    cache.set_kv_heads(H);
    cache.reorder(&[1, 0]).expect("with the head count");
}
