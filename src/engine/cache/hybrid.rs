//! The `hybrid` cache: one store per layer chosen by the model's own layer types
//! (transformers 5's `DynamicCache(config=...)` for Gemma 2 / 3: a
//! `DynamicSlidingWindowLayer` on every `sliding_attention` layer, a `DynamicLayer`
//! on the others; transformers < 4.56 called it `HybridCache`).
//!
//! - A layer with a window W (`ModelCache`'s per-layer windows, from
//!   [`Model::layer_windows`](crate::engine::model::Model::layer_windows)) is a sliding store
//!   that keeps the last `W - 1` positions (at least 1), what transformers 5's
//!   sliding layers keep: the next query at p sees keys in (p - W, p], the W - 1
//!   stored ones and its own. A pass of several tokens reads everything it was given
//!   (its mask limits each query to the window).
//! - A layer without a window is global: append by concatenation (`dynamic`), or,
//!   with `max_len`, preallocated to that many positions (`static`, the
//!   `HybridCache` of transformers < 4.56, which PEFT built with a `max_cache_len`).
//!   A pass that needs more is a `seq-len` diagnosis at the first global layer.
//!   Historical (before PEFT sized `max_cache_len` as input + `num_virtual_tokens`):
//!   the capacity without the prefix's P positions (`cache.capacity_without_prefix`).
//!
//! The prefix is written into every layer, like PEFT's prefix in transformers'
//! cache: the sliding layers evict it once P + tokens exceed their window (the
//! `prefix-evicted` warning, one per sliding layer, [`prefix_evictions`]). A family
//! without layer types (`gpt2`, `bloom`, `t5`, `llama` without `sliding_window`, ...)
//! has every layer global: `hybrid` is then `dynamic`. Every event of a hybrid cache
//! names its layer's store in the trace (`store`: `sliding/W` or `global`).

use crate::engine::diagnosis::{Attention, Diagnosis, DiagnosisClass, TensorKind};

/// A global layer, in the diagnosis of one that ran out of room.
pub const GLOBAL_LAYER: &str = "the hybrid cache's global layer";

/// The hint of a global layer that ran out of room.
pub const CAPACITY_HINT: &str = "the hybrid cache's global layers were sized without the P virtual tokens (PEFT's HybridCache max_cache_len must be input + num_virtual_tokens + new tokens)";

/// Positions a sliding layer of window `w` keeps between passes: `w - 1`, at least 1.
pub fn keep(w: usize) -> usize {
    w.saturating_sub(1).max(1)
}

/// The trace's name of a layer's store: `sliding/W` or `global`.
pub fn describe(window: Option<usize>) -> String {
    match window {
        Some(w) => format!("sliding/{w}"),
        None => "global".into(),
    }
}

/// The `prefix-evicted` warning of layer `layer` with attention window `window`, when
/// the window drops some of the `p` prefix positions before the last forward pass
/// (prompt of `prompt_len`, `new` generated tokens, the last one never fed back).
pub fn prefix_evicted(
    layer: usize,
    window: usize,
    p: usize,
    prompt_len: usize,
    new: usize,
) -> Option<Diagnosis> {
    // Positions the last forward pass queries: P + S + (new - 1) - 1.
    let last = p + prompt_len + new.saturating_sub(1) - 1;
    let evicted = (last + 1).saturating_sub(window).min(p);
    (evicted > 0).then(|| {
        Diagnosis::new(
            DiagnosisClass::PrefixEvicted,
            format!(
                "the sliding window ({window}) keeps positions {}..={last} at the last step: {evicted} of the {p} prefix positions are evicted",
                last + 1 - window.min(last + 1)
            ),
        )
        .at(layer, Attention::SelfAttn, TensorKind::Key)
        .shapes(&[p + prompt_len + new - 1], &[window])
        .hint("a window smaller than P + prompt + new tokens silently drops the virtual tokens; make the window at least that large or the prefix stops conditioning generation")
    })
}

/// One `prefix-evicted` warning per sliding layer of `windows` (one window per layer)
/// that evicts prefix positions.
pub fn prefix_evictions(
    windows: &[Option<usize>],
    p: usize,
    prompt_len: usize,
    new: usize,
) -> Vec<Diagnosis> {
    windows
        .iter()
        .enumerate()
        .filter_map(|(i, w)| prefix_evicted(i, (*w)?, p, prompt_len, new))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_layers_keep_one_position_less_than_their_window() {
        assert_eq!((keep(8), keep(2), keep(1)), (7, 1, 1));
        assert_eq!(describe(Some(6)), "sliding/6");
        assert_eq!(describe(None), "global");
    }

    #[test]
    fn evictions_are_reported_per_sliding_layer() {
        // P 5 + prompt 4 + 3 new: the last pass queries position 10; a window of 6
        // keeps 5..=10, evicting prefix positions 0..=4; a window of 12 none.
        let w = prefix_evictions(&[Some(6), None, Some(12), Some(6)], 5, 4, 3);
        let layers: Vec<_> = w.iter().map(|d| d.layer).collect();
        assert_eq!(layers, [Some(0), Some(3)]);
        assert!(
            w[0].message.contains("5 of the 5 prefix positions"),
            "{}",
            w[0].message
        );
        assert!(prefix_evictions(&[None, None], 5, 4, 3).is_empty());
    }
}
