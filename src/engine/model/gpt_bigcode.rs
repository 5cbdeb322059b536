//! GPT-BigCode (StarCoder): learned positions, multi-query attention (one KV head
//! shared by every query head), fused `c_attn` (`nn.Linear`, weights `[out, in]`),
//! tied LM head. Parameter names follow `GPTBigCodeForCausalLM`.
//!
//! Cache geometry: `[B, 1, S, n_embd / n_head]` with `multi_query` (the default),
//! `[B, n_head, S, D]` without. Older transformers stored one fused `[B, S, 2*D]`
//! tensor per layer (keys then values along the last dimension): `cache: legacy`.
//!
//! The model is GPT-2's ([`super::gpt2::Gpt2`]) with `nn.Linear` projections.

use serde::{Deserialize, Serialize};

use super::gpt2::{DecoderSpec, QkvColumns};
use super::weights::linear_params;
use super::{Family, ModelGeometry};

/// `GPTBigCodeConfig` (Hugging Face field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub multi_query: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_true() -> bool {
    true
}

impl Config {
    pub fn tiny() -> Self {
        Self {
            vocab_size: 256,
            n_positions: 128,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            multi_query: true,
        }
    }

    /// GPT-2's decoder with `nn.Linear` projections and one KV head (multi-query) or
    /// per-head q, k, v columns.
    pub fn decoder(&self) -> DecoderSpec {
        DecoderSpec {
            family: Family::GptBigcode,
            geometry: self.geometry(),
            n_positions: self.n_positions,
            inner: self.n_inner.unwrap_or(4 * self.n_embd),
            eps: self.layer_norm_epsilon,
            columns: match self.multi_query {
                true => QkvColumns::Contiguous { kv_heads: 1 },
                false => QkvColumns::PerHead,
            },
            projection: linear_params,
        }
    }

    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.n_layer,
            num_attention_heads: self.n_head,
            num_kv_heads: if self.multi_query { 1 } else { self.n_head },
            head_dim: self.n_embd / self.n_head.max(1),
            hidden_size: self.n_embd,
            vocab_size: self.vocab_size,
            max_positions: Some(self.n_positions),
            encoder_decoder: false,
        }
    }
}
