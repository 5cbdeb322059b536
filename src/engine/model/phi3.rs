//! Phi-3: the Llama decoder ([`super::llama`]) with fused projections: `qkv_proj`
//! (queries, keys and values concatenated along the output dimension, GQA sizes
//! `[H*D + 2*KVH*D, E]`) and `gate_up_proj` (gate then up, `[2*I, E]`), RMSNorm,
//! RoPE over the whole head and an optional `sliding_window` in every layer.
//! Parameter names follow `Phi3ForCausalLM`; the fused weights are split when loaded
//! ([`Block::fused`]), so the forward pass is Llama's.
//!
//! Cache geometry: `[B, num_key_value_heads, S, hidden_size / num_attention_heads]`.
//!
//! Not supported (refused when the config asks for them): `partial_rotary_factor`
//! other than 1 and `rope_scaling` types other than `default` / `linear` (Phi-3's
//! `longrope` / `su` / `yarn`).

use serde::{Deserialize, Serialize};

use super::llama::{self, Block};
use super::Family;
use crate::engine::diagnosis::{EngineError, Result};

/// `Phi3Config` (Hugging Face field names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: llama::Core,
    pub original_max_position_embeddings: usize,
    /// RoPE on the first `partial_rotary_factor * head_dim` dimensions (Phi-4-mini);
    /// only 1 (absent) is supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// `null` (the default): no window; else the window of every layer.
    pub sliding_window: Option<usize>,
}

impl Config {
    /// Hidden 64, 3 layers, 4 attention heads over 2 KV heads (head_dim 16, so
    /// `qkv_proj` is `[128, 64]`, not three equal thirds), intermediate 96
    /// (`gate_up_proj` `[192, 64]`), vocabulary 256, untied, no window.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/phi3.json"))
    }

    /// The Llama decoder this config describes.
    pub fn decoder(&self) -> (llama::Config, Block) {
        let cfg = llama::Config {
            sliding_window: self.sliding_window,
            ..llama::Config::plain(&self.core)
        };
        let block = Block {
            family: Family::Phi3,
            fused: true,
            ..Block::llama(&cfg)
        };
        (cfg, block)
    }

    /// What the Llama decoder cannot express: partial rotary.
    pub fn check(&self) -> Result<()> {
        match self.partial_rotary_factor {
            Some(f) if f != 1.0 => Err(EngineError::Config(format!(
                "phi3: partial_rotary_factor {f} is not supported (only 1)"
            ))),
            _ => Ok(()),
        }
    }
}
