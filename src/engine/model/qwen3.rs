//! Qwen3: the Llama decoder ([`super::llama`]) with a per-head RMSNorm on queries and
//! keys (`self_attn.q_norm`, `self_attn.k_norm`, weights `[head_dim]`, applied to
//! `[B, H, S, D]` before RoPE), an explicit `head_dim` that usually differs from
//! `hidden_size / num_attention_heads`, `attention_bias` (q/k/v and o, off by default)
//! and Qwen2's sliding-window settings. Parameter names follow `Qwen3ForCausalLM`.
//!
//! Cache geometry: `[B, num_key_value_heads, S, head_dim]`. PEFT before 0.18 sized the
//! prefix from `hidden_size / num_attention_heads` instead (`head_dim_from:
//! hidden-over-heads` reproduces it).

use serde::{Deserialize, Serialize};

use super::llama::{self, Block};
use super::qwen2::SlidingWindows;
use super::Family;

/// `Qwen3Config` (Hugging Face field names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: llama::Core,
    pub head_dim: usize,
    /// Biases on q/k/v and o.
    pub attention_bias: bool,
    #[serde(flatten)]
    pub sliding: SlidingWindows,
}

impl Config {
    /// Hidden 64, 3 layers, 4 attention heads over 2 KV heads, head_dim 24 (not
    /// 64 / 4 = 16), vocabulary 256, no attention bias, tied embeddings.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/qwen3.json"))
    }

    /// The Llama decoder this config describes.
    pub fn decoder(&self) -> (llama::Config, Block) {
        let cfg = llama::Config {
            head_dim: Some(self.head_dim),
            attention_bias: self.attention_bias,
            ..llama::Config::plain(&self.core)
        };
        let block = Block {
            family: Family::Qwen3,
            qk_norm: true,
            windows: self.sliding.per_layer(self.core.sizes.num_hidden_layers),
            ..Block::llama(&cfg)
        };
        (cfg, block)
    }
}
