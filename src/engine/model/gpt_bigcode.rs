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

use super::gpt2::{self, DecoderSpec, QkvColumns};
use super::weights::linear_params;
use super::{Family, ModelGeometry};

/// `GPTBigCodeConfig` (Hugging Face field names): GPT-2's fields and `multi_query`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub gpt2: gpt2::Config,
    #[serde(default = "default_true")]
    pub multi_query: bool,
}

fn default_true() -> bool {
    true
}

impl Config {
    /// GPT-2's tiny config, multi-query.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/gpt_bigcode.json"))
    }

    /// GPT-2's decoder with `nn.Linear` projections and one KV head (multi-query) or
    /// per-head q, k, v columns.
    pub fn decoder(&self) -> DecoderSpec {
        DecoderSpec {
            family: Family::GptBigcode,
            geometry: self.geometry(),
            columns: match self.multi_query {
                true => QkvColumns::Contiguous { kv_heads: 1 },
                false => QkvColumns::PerHead,
            },
            projection: linear_params,
            ..self.gpt2.decoder()
        }
    }

    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_kv_heads: if self.multi_query {
                1
            } else {
                self.gpt2.n_head
            },
            ..self.gpt2.geometry()
        }
    }
}
