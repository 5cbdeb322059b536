//! Property tests of the cache invariants, over prefix length P (1..=64), batch B
//! (1..=8), prompt length, new tokens, head geometry (attention heads, KV heads,
//! head_dim), every family and every cache mode.
//!
//! Each invariant is its own property, so a failure names the invariant and proptest
//! shrinks it to a minimal setup (P, B, S, ... shrink towards 1, the family towards
//! GPT-2, the mode towards `none`, the geometry towards one head). Cases per property:
//! `PROPTEST_CASES` (default 24). Failing seeds are kept in
//! `tests/it/properties/cache.proptest-regressions` (commit it: the seeds replay first).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::cache::{hybrid, CacheConfig, CacheMode, Layout};
use prefix_harness::engine::diagnosis::{Attention, DiagnosisClass};
use prefix_harness::engine::generate::{
    DecodeOptions, DecodeOutput, Generation, Strategy as Decoding,
};
use prefix_harness::engine::model::attention::{additive_mask, MaskSpec};
use prefix_harness::engine::model::{
    bloom, gemma2, gemma3, gpt2, gpt_bigcode, gpt_neox, llama, mistral, phi3, qwen2, qwen3, t5,
    weights, Family, Model, ModelConfig, ModelGeometry, Sizes,
};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::engine::trace::{CacheOp, Trace, TraceEvent};
use prefix_harness::engine::train::{batch_for, batch_loss, check_prefix_grads};
use prefix_harness::io::data;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        max_shrink_iters: 400,
        ..proptest_config(24)
    }
}

// ---------------------------------------------------------------------------------
// Setups

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    Dynamic,
    Static,
    Sliding,
    Rotating,
    Legacy,
    Quantized,
    Hybrid,
}

const DECODER_ONLY: [Family; 11] = [
    Family::Gpt2,
    Family::Llama,
    Family::Bloom,
    Family::GptBigcode,
    Family::Qwen2,
    Family::Mistral,
    Family::Qwen3,
    Family::Phi3,
    Family::GptNeox,
    Family::Gemma2,
    Family::Gemma3,
];

const MODES: [Mode; 8] = [
    Mode::None,
    Mode::Dynamic,
    Mode::Static,
    Mode::Sliding,
    Mode::Rotating,
    Mode::Legacy,
    Mode::Quantized,
    Mode::Hybrid,
];

/// Head geometry as small raw numbers (shrink towards one head, head_dim 2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Heads {
    /// attention heads = 2^h (1..=8)
    h: u32,
    /// Grouped-query attention: Llama KV heads = 2^(h - min(group, h)) (query heads
    /// per KV head 2^group, up to all of them); GPT-BigCode multi-query when > 0.
    /// 0 is plain multi-head attention, where shrinking ends unless GQA matters.
    group: u32,
    /// Llama head_dim and T5 d_kv = 2 * half (2..=32).
    half: usize,
}

/// One generation: model, prefix, prompt, cache.
#[derive(Clone, Copy)]
struct Setup {
    family: Family,
    mode: Mode,
    p: usize,
    b: usize,
    /// Prompt length (the encoder input for T5).
    s: usize,
    new: usize,
    heads: Heads,
    /// Sliding window W; `quantized`: residual `1 + W % 8`.
    window: usize,
    /// Static cache: spare positions beyond what the generation needs; `quantized`:
    /// 8 bits when even, else 4, the prefix kept exact when at least 2.
    slack: usize,
}

impl Setup {
    fn model_config(&self) -> ModelConfig {
        let heads = 1usize << self.heads.h;
        let kv = 1usize << (self.heads.h - self.heads.group.min(self.heads.h));
        // A Llama-like core with the drawn heads over `kv` KV heads; with
        // `hidden_follows`, hidden = heads x the drawn head_dim.
        let core = |tiny: llama::Core, hidden_follows: bool| llama::Core {
            sizes: Sizes {
                num_attention_heads: heads,
                hidden_size: if hidden_follows {
                    heads * 2 * self.heads.half
                } else {
                    tiny.sizes.hidden_size
                },
                ..tiny.sizes
            },
            num_key_value_heads: Some(kv),
            ..tiny
        };
        // A Gemma core with the drawn heads over `kv` KV heads and head_dim drawn
        // independently of hidden 64, and the window P + W of its sliding layers.
        let gemma = |tiny: gemma2::Core| {
            let core = gemma2::Core {
                sizes: Sizes {
                    num_attention_heads: heads,
                    ..tiny.sizes
                },
                num_key_value_heads: kv,
                head_dim: 2 * self.heads.half,
                ..tiny
            };
            (core, Some(self.p + self.window))
        };
        match self.family {
            Family::Gpt2 => ModelConfig::Gpt2(gpt2::Config {
                n_head: heads,
                ..gpt2::Config::tiny()
            }),
            Family::Bloom => ModelConfig::Bloom(bloom::Config {
                n_head: heads,
                ..bloom::Config::tiny()
            }),
            Family::GptBigcode => ModelConfig::GptBigcode(gpt_bigcode::Config {
                gpt2: gpt2::Config {
                    n_head: heads,
                    ..gpt2::Config::tiny()
                },
                // The fused legacy layout exists for multi-query models only.
                multi_query: self.heads.group > 0 || self.mode == Mode::Legacy,
            }),
            Family::Llama => ModelConfig::Llama(llama::Config {
                core: core(llama::Config::tiny().core, false),
                head_dim: Some(2 * self.heads.half),
                ..llama::Config::tiny()
            }),
            // head_dim = hidden / heads: the hidden size follows the drawn head_dim. The
            // upper two layers slide with a window of P + W (the first real token sees
            // every virtual token, so every prefix parameter can get a gradient).
            Family::Qwen2 => ModelConfig::Qwen2(qwen2::Config {
                core: core(qwen2::Config::tiny().core, true),
                sliding: qwen2::SlidingWindows {
                    use_sliding_window: true,
                    sliding_window: Some(self.p + self.window),
                    ..qwen2::Config::tiny().sliding
                },
            }),
            Family::Mistral => ModelConfig::Mistral(mistral::Config {
                core: core(mistral::Config::tiny().core, false),
                head_dim: Some(2 * self.heads.half),
                // Every layer slides, with a window of P + W (see Qwen2).
                sliding_window: Some(self.p + self.window),
            }),
            Family::Qwen3 => ModelConfig::Qwen3(qwen3::Config {
                core: core(qwen3::Config::tiny().core, false),
                head_dim: 2 * self.heads.half,
                ..qwen3::Config::tiny()
            }),
            // head_dim = hidden / heads; every layer slides with a window of P + W
            // (see Qwen2).
            Family::Phi3 => ModelConfig::Phi3(phi3::Config {
                core: core(phi3::Config::tiny().core, true),
                sliding_window: Some(self.p + self.window),
                ..phi3::Config::tiny()
            }),
            // MHA, head_dim = hidden / heads; rotary on half of each head when that
            // is even (pct 0.5 x 2 * half = half), else on all of it.
            Family::GptNeox => ModelConfig::GptNeox(gpt_neox::Config {
                sizes: Sizes {
                    num_attention_heads: heads,
                    hidden_size: heads * 2 * self.heads.half,
                    ..gpt_neox::Config::tiny().sizes
                },
                rotary_pct: if self.heads.half.is_multiple_of(2) {
                    0.5
                } else {
                    1.0
                },
                ..gpt_neox::Config::tiny()
            }),
            // head_dim drawn independently of hidden 64; the even layers slide with a
            // window of P + W (see Qwen2).
            Family::Gemma2 => {
                let (core, attn) = gemma(gemma2::Config::tiny().core);
                let tiny = gemma2::Config::tiny();
                ModelConfig::Gemma2(gemma2::Config {
                    core,
                    attn: gemma2::Attn {
                        sliding_window: attn,
                        ..tiny.attn.clone()
                    },
                    ..tiny
                })
            }
            // head_dim drawn independently of hidden 64; layers 0, 1, 3, 4 slide with a
            // window of P + W (see Qwen2).
            Family::Gemma3 => {
                let (core, attn) = gemma(gemma3::Config::tiny().core);
                let tiny = gemma3::Config::tiny();
                ModelConfig::Gemma3(gemma3::Config {
                    core,
                    attn: gemma2::Attn {
                        sliding_window: attn,
                        ..tiny.attn.clone()
                    },
                    ..tiny
                })
            }
            Family::T5 => ModelConfig::T5(t5::Config {
                num_heads: heads,
                d_kv: 2 * self.heads.half,
                ..t5::Config::tiny()
            }),
        }
    }

    fn model(&self) -> Box<dyn Model> {
        self.model_config()
            .build(weights::seeded(SEED, DType::F32, &Device::Cpu))
            .unwrap_or_else(|e| panic!("{self:?}: model builds: {e}"))
    }

    /// Decoder tokens fed at the prefill: the prompt, or T5's start token.
    fn s_dec(&self) -> usize {
        if self.family == Family::T5 {
            1
        } else {
            self.s
        }
    }

    fn cache(&self) -> CacheConfig {
        CacheConfig::new(match self.mode {
            Mode::None => CacheMode::None,
            Mode::Dynamic => CacheMode::Dynamic,
            // The last generated token is never fed back.
            Mode::Static => CacheMode::Static {
                max_len: self.p + self.s_dec() + self.new - 1 + self.slack,
            },
            Mode::Sliding => CacheMode::Sliding {
                window: self.window,
            },
            Mode::Rotating => CacheMode::Rotating {
                window: self.window,
            },
            Mode::Legacy => CacheMode::Legacy,
            // Each layer's store from the model's windows (P + W in the families
            // that have them).
            Mode::Hybrid => CacheMode::Hybrid { max_len: None },
            Mode::Quantized => CacheMode::Quantized {
                bits: if self.slack.is_multiple_of(2) { 8 } else { 4 },
                residual: 1 + self.window % 8,
                prefix_full_precision: self.slack >= 2,
            },
        })
    }

    fn layout(&self) -> Layout {
        match self.mode {
            Mode::Legacy => self.family.legacy_layout(),
            _ => Layout::Standard,
        }
    }

    fn prefix(&self, model: &dyn Model) -> PrefixEncoder {
        prefix(model, self.p)
    }

    /// Greedy generation (or `strategy`) with `ids`; the trace even on failure.
    fn run_with(
        &self,
        model: &dyn Model,
        opts: &DecodeOptions,
        ids: &Tensor,
    ) -> (Result<DecodeOutput, String>, Trace) {
        let prefix = self.prefix(model);
        let (out, trace) = Generation {
            model,
            prefix: Some(&prefix),
            opts,
            ids,
            pad: None,
        }
        .generate_traced();
        (out.map_err(|e| format!("{self:?}: {e}")), trace)
    }

    fn run(&self, model: &dyn Model) -> Result<(DecodeOutput, Trace), String> {
        let opts = DecodeOptions::new(self.cache(), self.new);
        let (out, trace) = self.run_with(model, &opts, &prompt(self.b, self.s));
        out.map(|o| (o, trace))
    }
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.model_config().geometry();
        write!(f, "{}/{:?}", self.family.name(), self.mode)?;
        match self.mode {
            Mode::Sliding | Mode::Rotating => write!(f, "(W={})", self.window)?,
            Mode::Static => write!(f, "(spare {})", self.slack)?,
            Mode::Quantized => write!(f, "({:?})", self.cache().mode)?,
            _ => {}
        }
        write!(
            f,
            " P={} B={} S={} new={} heads={} kv_heads={} head_dim={}",
            self.p, self.b, self.s, self.new, g.num_attention_heads, g.num_kv_heads, g.head_dim
        )
    }
}

fn heads() -> impl Strategy<Value = Heads> {
    (0u32..=3, 0u32..=3, 1usize..=16).prop_map(|(h, group, half)| Heads { h, group, half })
}

/// A setup of `family` (or any family) in `mode` (or any mode).
fn setup_in(families: &'static [Family], modes: &'static [Mode]) -> impl Strategy<Value = Setup> {
    (
        (0..families.len(), 0..modes.len()),
        (1usize..=64, 1usize..=8, 1usize..=12, 1usize..=5),
        heads(),
        (1usize..=48, 0usize..=3),
    )
        .prop_map(
            move |((fi, mi), (p, b, s, new), heads, (window, slack))| Setup {
                family: families[fi],
                mode: modes[mi],
                p,
                b,
                s,
                new,
                heads,
                window,
                slack,
            },
        )
}

fn setup() -> impl Strategy<Value = Setup> {
    setup_in(&Family::ALL, &MODES)
}

// ---------------------------------------------------------------------------------
// Trace helpers

fn self_updates(trace: &Trace) -> impl Iterator<Item = &TraceEvent> {
    trace
        .events
        .iter()
        .filter(|e| e.attention == Attention::SelfAttn && e.op == CacheOp::Update)
}

fn at_step(trace: &Trace, step: usize, layer: usize, attention: Attention) -> Vec<&TraceEvent> {
    trace
        .events
        .iter()
        .filter(|e| e.step == step && e.layer == layer && e.attention == attention)
        .collect()
}

/// Keys the self-attention reads at `step` (cache length before the step + new tokens)
/// in a layer whose own window (`Model::layer_windows`) is `layer_window`.
fn keys_at_step(st: &Setup, step: usize, layer_window: Option<usize>) -> usize {
    let total = st.p + st.s_dec() + step;
    match (st.mode, layer_window) {
        (Mode::Sliding | Mode::Rotating, _) if step > 0 => (total - 1).min(st.window) + 1,
        (Mode::Hybrid, Some(w)) if step > 0 => (total - 1).min(hybrid::keep(w)) + 1,
        _ => total,
    }
}

fn err(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

mod cache;
mod hostile;
