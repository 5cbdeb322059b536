//! Mistral: the Llama decoder ([`super::llama`]) without biases, with grouped-query
//! attention, an optional explicit `head_dim` and a `sliding_window` (every layer;
//! `null` for none) that limits attention. Parameter names follow
//! `MistralForCausalLM` (Llama's).
//!
//! Cache geometry: `[B, num_key_value_heads, S, head_dim]`.

use serde::{Deserialize, Serialize};

use super::llama::{self, Block};
use super::Family;

/// `MistralConfig` (Hugging Face field names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: llama::Core,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Absent: 4096 (Mistral 7B v0.1); `null`: full attention (v0.2 on).
    pub sliding_window: Option<usize>,
}

impl Config {
    /// Hidden 64, 3 layers, 8 attention heads over 2 KV heads, head_dim 8 (hidden /
    /// heads, not written: `head_dim: null`), vocabulary 256, and a window of 4096
    /// that the tiny prompts never reach (a scenario shortens it).
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/mistral.json"))
    }

    /// The Llama decoder this config describes.
    pub fn decoder(&self) -> (llama::Config, Block) {
        let cfg = llama::Config {
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
            ..llama::Config::plain(&self.core)
        };
        let block = Block {
            family: Family::Mistral,
            ..Block::llama(&cfg)
        };
        (cfg, block)
    }
}
