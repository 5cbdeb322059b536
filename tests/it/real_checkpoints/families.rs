//! The newer families (issue 18) against PEFT 0.21.2 + transformers 5.24: one fixture
//! per row of the table below, each run by [`parity_in`] in the listed cache modes
//! (logits <= 1e-4, greedy tokens exact, in every mode; the stored key shapes after the
//! prefill in the first mode, the one whose stores are the reference's).
//!
//! What the reference does with a prefix in a sliding layer (transformers 5.24, PEFT
//! 0.21.2, read in `PeftModel.get_prompt` and `cache_utils.DynamicSlidingWindowLayer`):
//! - Gemma 2 / Gemma 3: `get_prompt` builds `DynamicCache(config=...)`, a
//!   `DynamicSlidingWindowLayer` per `sliding_attention` layer and a `DynamicLayer`
//!   per global one, and writes the P prefix positions into it with `update`. A
//!   sliding layer keeps only the last W - 1 of what it is given (here 3 of the 4
//!   prefix positions), which are exactly the prefix positions the first prompt token
//!   can see; after the prefill it holds the last W - 1 positions of prefix + prompt
//!   and the global layer all P + S. That is the engine's `hybrid` cache (compared
//!   stores included, `[2, KVH, 3, 12]` / `[2, KVH, 10, 12]`); `dynamic` keeps
//!   everything and masks by the window: the same logits and tokens.
//! - Qwen2 and Mistral: `get_prompt` builds `DynamicCache(prefix tensors)`, every layer
//!   a `DynamicLayer` that keeps all P + S positions; the window is applied by the
//!   sliding-window mask, by cache position (a query at p sees keys in (p - W, p]),
//!   in Mistral's every layer and in Qwen2's layers >= `max_window_layers` (here 1 and
//!   2). That is the engine's `dynamic` cache (compared stores); `hybrid` (the cache
//!   transformers' `generate()` would build from the config) gives the same logits and
//!   tokens, and for Mistral, whose every layer slides, so do `sliding` and `rotating`
//!   with the config's window. The engine's `sliding` mode puts its window on every
//!   layer, so it is not Qwen2's (layer 0 is global) nor Gemma's.
//!
//! Geometry (hidden 32, vocabulary 256, 3 layers, prefix P = 4, prompt `[2, 6]`; made
//! by `ci/fixtures/make_fixtures.py`, described in `ci/fixtures/README.md`):
//!
//! | case | what is awkward |
//! |---|---|
//! | `llama3-rope` | `rope_type: llama3` with an original context of 8 (< P + S + 8) |
//! | `qwen2`, `qwen2-leftpad` | one KV head, q/k/v biases, window 4 on layers 1 and 2 only |
//! | `qwen3`, `qwen3-proj` | per-head q/k norm, head_dim 12 != 32 / 4, GQA, `attention_bias` |
//! | `mistral`, `mistral-leftpad` | window 5 on every layer, GQA |
//! | `phi3` | fused `qkv_proj` with GQA sizes, fused `gate_up_proj` |
//! | `gpt_neox` | `rotary_pct` 0.5, parallel residual, fused `[H, 3, D]` qkv |
//! | `gemma2` | head_dim 12, `query_pre_attn_scalar` 16, caps 5 / 8, window 4 on layers 0, 2 |
//! | `gemma3`, `gemma3-leftpad` | one KV head, head_dim 12, q/k norm, scalar 32, local / global RoPE |
//!
//! Each of these deliberate engine breaks (applied one at a time, then reverted) makes
//! the tests named fail, at the first mode's logits (max abs diff) unless said:
//!
//! | break | failing tests |
//! |---|---|
//! | Gemma's (1 + w) RMSNorm as w (`gemma_norm`) | gemma2, gemma3, gemma3-leftpad (2.1 .. 6.3) |
//! | Gemma's `query_pre_attn_scalar` as head_dim | gemma2, gemma3, gemma3-leftpad (0.45 .. 1.1) |
//! | Gemma 2's attention soft-cap dropped | gemma2 (1.6) |
//! | Gemma 2's final soft-cap dropped | gemma2 (1.9) |
//! | Gemma's layer windows ignored | gemma2, gemma3, gemma3-leftpad (1.8 .. 3.8) |
//! | Gemma 3's sliding layers with the global RoPE base | gemma3, gemma3-leftpad (0.20, 0.46) |
//! | Gemma 3's global linear RoPE scaling ignored | gemma3, gemma3-leftpad (0.33, 0.37) |
//! | `hybrid` sliding stores keep W positions, not W - 1 | gemma2, gemma3, gemma3-leftpad (stored key shapes) |
//! | Qwen3's q/k norm skipped | qwen3, qwen3-proj (10.5, 10.9) |
//! | Qwen2's q/k/v biases dropped | qwen2, qwen2-leftpad (3.9, 3.0) |
//! | Qwen2's layer types ignored (every layer slides) | qwen2, qwen2-leftpad (12.2, 12.9) |
//! | the Llama decoder's layer windows ignored | qwen2, qwen2-leftpad, mistral, mistral-leftpad (3.2 .. 11.0) |
//! | Phi-3's fused qkv split as q, v, k | phi3 (10.9) |
//! | GPT-NeoX's `rotary_pct` ignored (RoPE on the whole head) | gpt_neox (5.0) |
//! | GPT-NeoX's residual sequential instead of parallel | gpt_neox (8.4) |
//! | Llama 3 RoPE scaling ignored | llama3-rope (9.5) |

use super::peft::parity_in;
use prefix_harness::engine::cache::CacheMode;

const DYNAMIC: CacheMode = CacheMode::Dynamic;
const HYBRID: CacheMode = CacheMode::Hybrid { max_len: None };
/// Mistral's window (`sliding_window` 5 in its `config.json`), on every layer.
const SLIDING_5: CacheMode = CacheMode::Sliding { window: 5 };
const ROTATING_5: CacheMode = CacheMode::Rotating { window: 5 };

/// `test_name: "case" in [modes];` -> one `#[test]` per fixture, running
/// [`parity_in`] in those modes (the first: the reference's own cache).
macro_rules! fixtures {
    ($($(#[$attr:meta])* $test:ident: $case:literal in [$($mode:expr),+ $(,)?];)+) => {
        $(
            $(#[$attr])*
            #[test]
            fn $test() {
                parity_in($case, &[$($mode),+]);
            }
        )+
    };
}

fixtures! {
    llama3_rope_scaling: "llama3-rope" in [DYNAMIC];
    qwen2_one_kv_head_window_on_upper_layers: "qwen2" in [DYNAMIC, HYBRID];
    qwen2_left_padded: "qwen2-leftpad" in [DYNAMIC, HYBRID];
    qwen3_qk_norm_head_dim: "qwen3" in [DYNAMIC];
    qwen3_projection: "qwen3-proj" in [DYNAMIC];
    mistral_window_every_layer: "mistral" in [DYNAMIC, HYBRID, SLIDING_5, ROTATING_5];
    mistral_left_padded: "mistral-leftpad" in [DYNAMIC, HYBRID, SLIDING_5, ROTATING_5];
    phi3_fused_projections: "phi3" in [DYNAMIC];
    gpt_neox_partial_rotary_parallel_residual: "gpt_neox" in [DYNAMIC];
    gemma2_softcaps_scalar_sliding_layers: "gemma2" in [HYBRID, DYNAMIC];
    gemma3_text_qk_norm_local_global_rope: "gemma3" in [HYBRID, DYNAMIC];
    gemma3_left_padded: "gemma3-leftpad" in [HYBRID, DYNAMIC];
}
