//! The family x cache-mode grid: after a prefill every layer's key has the cache's
//! declared layout and length P+S (sliding: min(P+S, W); hybrid: min(P+S, W - 1) in a
//! layer with a window W, P+S in a global layer), and cached decoding
//! reproduces recomputation (`none`) to 1e-4, token for token.

use crate::common::*;
use prefix_harness::engine::cache::{CacheConfig, CacheMode, Layout};
use prefix_harness::engine::diagnosis::Attention;
use prefix_harness::engine::generate::{greedy, DecodeOptions};
use prefix_harness::engine::model::Family;
use prefix_harness::engine::trace::CacheOp;

const PROMPT: usize = 6;
const STEPS: usize = 5;
const WINDOW: usize = 8;

fn mode(name: &str) -> CacheMode {
    crate::common::cache_mode(name, 48, WINDOW)
}

family_test!(
    ALL,
    cached_decoding_matches_recompute_and_keys_have_the_declared_layout,
    |family: Family,
     #[values("none", "dynamic", "static", "sliding", "legacy", "hybrid")] mode_name: &str,
     #[values(1, 7)] p: usize,
     #[values(1, 3)] batch: usize| {
        let model = tiny_model(family);
        let g = model.geometry();
        let prefix = prefix(model.as_ref(), p);
        let ids = prompt(batch, PROMPT);
        let cfg = CacheConfig::new(mode(mode_name));
        let out = greedy(
            model.as_ref(),
            Some(&prefix),
            &DecodeOptions::new(cfg.clone(), STEPS),
            &ids,
            None,
        )
        .unwrap_or_else(|e| panic!("{family:?}/{mode_name}: {e}"));

        // The reference: recompute everything each step, with the same attention window.
        let mut reference_cfg = CacheConfig::new(CacheMode::None);
        reference_cfg.window = cfg.window;
        let reference = greedy(
            model.as_ref(),
            Some(&prefix),
            &DecodeOptions::new(reference_cfg, STEPS),
            &ids,
            None,
        )
        .expect("recompute runs");
        assert_eq!(
            out.tokens, reference.tokens,
            "{family:?}/{mode_name}: tokens differ from recompute"
        );
        for (step, (a, b)) in out.logits.iter().zip(&reference.logits).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-4,
                "{family:?}/{mode_name} step {step}: logits differ from recompute by {d}"
            );
        }

        // After the prefill (step 0) each layer holds P + S positions (sliding: at most W),
        // in the layout the cache declares.
        let layout = out.cache.layout;
        let expected_layout = match mode(mode_name) {
            CacheMode::Legacy => family.legacy_layout(),
            _ => Layout::Standard,
        };
        assert_eq!(layout, expected_layout);
        let s = if g.encoder_decoder { 1 } else { PROMPT };
        let held = match mode(mode_name) {
            CacheMode::Sliding { window } => (p + s).min(window),
            CacheMode::None => p, // recompute keeps only the prefix
            _ => p + s,
        };
        for (layer, layer_window) in model.layer_windows().into_iter().enumerate() {
            let held = match (mode(mode_name), layer_window) {
                (CacheMode::Hybrid { .. }, Some(w)) => {
                    held.min(prefix_harness::engine::cache::hybrid::keep(w))
                }
                _ => held,
            };
            let e = out
                .cache
                .trace
                .events
                .iter()
                .find(|e| {
                    e.step == 0
                        && e.layer == layer
                        && e.attention == Attention::SelfAttn
                        && e.op == CacheOp::Update
                })
                .expect("prefill event");
            let want = stored_key_shape(layout, batch, g.num_kv_heads, held, g.head_dim);
            match mode(mode_name) {
                CacheMode::None => assert_eq!(e.shapes.key_after, None, "recompute stores nothing"),
                _ => assert_eq!(
                    e.shapes.key_after.as_ref(),
                    Some(&want),
                    "{family:?}/{mode_name} layer {layer}"
                ),
            }
            // What attention read: every position of this pass, standard layout.
            assert_eq!(
                e.key_read.as_ref(),
                Some(&vec![batch, g.num_kv_heads, p + s, g.head_dim]),
                "{family:?}/{mode_name} layer {layer}: keys read at prefill"
            );
            assert_eq!(
                e.mask.as_ref(),
                Some(&vec![batch, 1, s, p + s]),
                "mask at prefill"
            );
            assert_eq!(
                e.positions,
                Some((p, p + s)),
                "real tokens start at position P"
            );
        }
    }
);
