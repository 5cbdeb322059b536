//! Gemma 3 (text: `Gemma3ForCausalLM`, `model_type` `gemma3_text`): the Gemma 2
//! decoder (`super::gemma2`) with
//!
//! - a per-head (1 + w) RMSNorm on queries and keys (`self_attn.q_norm`,
//!   `self_attn.k_norm`, weights `[head_dim]`) before RoPE;
//! - two RoPE bases: `rope_theta` (default 1e6, with `rope_scaling`) on the global
//!   layers, `rope_local_base_freq` (default 1e4, never scaled) on the sliding ones;
//!   transformers 5 writes both into `rope_parameters.{full_attention,
//!   sliding_attention}`;
//! - sliding and global layers from `layer_types`, else from `sliding_window_pattern`
//!   (default 6: layer i slides unless `(i + 1) % pattern == 0`);
//! - no soft-capping by default (`attn_logit_softcapping`, `final_logit_softcapping`:
//!   null).
//!
//! What stays Gemma 2's: `query_pre_attn_scalar ** -0.5` scaling, scaled embeddings,
//! four (1 + w) norms per layer, the GELU-tanh MLP, tied embeddings. This file maps the
//! config onto a `gemma2::Config` and a `gemma2::Block` ([`Config::decoder`]).
//! Cache geometry: `[B, num_key_value_heads, S, head_dim]`.

use serde::{Deserialize, Serialize};

use super::gemma2;
use super::llama::RopeParameters;
use super::nn::default_inv_freq;
use super::{Family, ModelGeometry};
use crate::engine::diagnosis::{EngineError, Result};

/// `Gemma3TextConfig` (Hugging Face field names; transformers 5's defaults): the
/// fields Gemma 2 shares ([`gemma2::Core`], [`gemma2::Attn`], [`gemma2::SoftCaps`])
/// and Gemma 3's own, in `config.json`'s order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: gemma2::Core,
    /// RoPE base of the sliding layers (`core.rope_theta`: of the global layers).
    pub rope_local_base_freq: f64,
    /// RoPE scaling of the global layers (transformers < 5; `default` or `linear`).
    pub rope_scaling: Option<Box<RopeParameters>>,
    /// transformers >= 5: per layer type, replacing the three fields above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Box<RopePerType>>,
    /// `layer_types` `null`: from `sliding_window_pattern`; `sliding_window` `null`: the
    /// sliding layers see everything.
    #[serde(flatten)]
    pub attn: gemma2::Attn,
    /// Older configs: every `pattern`-th layer is global (used without `layer_types`;
    /// absent: 6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    #[serde(flatten)]
    pub caps: gemma2::SoftCaps,
    /// EmbeddingGemma's bidirectional attention: refused.
    pub use_bidirectional_attention: Option<bool>,
}

/// transformers 5's `rope_parameters` of Gemma 3: one entry per layer type.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RopePerType {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_attention: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_attention: Option<RopeParameters>,
}

/// Every sixth layer is global when neither `layer_types` nor `sliding_window_pattern`
/// says otherwise (transformers' `Gemma3TextConfig`).
const DEFAULT_PATTERN: usize = 6;

impl Config {
    /// Hidden 64, 5 layers (0, 1, 3, 4 slide with a window of 6, shorter than the
    /// prefix plus the prompt in the scenarios; 2 is global: `sliding_window_pattern` 3), 4 attention
    /// heads over one KV head, head_dim 24 (not 64 / 4), `query_pre_attn_scalar` 32
    /// (neither head_dim nor hidden / heads), intermediate 96, vocabulary 256, RoPE
    /// bases 1e6 (global, linear scaling x2) and 1e4 (sliding), no soft-caps.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/gemma3.json"))
    }

    pub fn geometry(&self) -> ModelGeometry {
        self.core.geometry()
    }

    /// The type of each layer: `layer_types`, else from `sliding_window_pattern`.
    pub fn layer_types(&self) -> Result<Vec<String>> {
        if let Some(t) = &self.attn.layer_types {
            return Ok(t.clone());
        }
        let pattern = self.sliding_window_pattern.unwrap_or(DEFAULT_PATTERN);
        if pattern == 0 {
            return Err(EngineError::Config(
                "gemma3: sliding_window_pattern must be at least 1".into(),
            ));
        }
        Ok((0..self.core.sizes.num_hidden_layers)
            .map(|i| {
                if (i + 1) % pattern != 0 {
                    "sliding_attention".into()
                } else {
                    "full_attention".into()
                }
            })
            .collect())
    }

    /// RoPE inverse frequencies `[D/2]` of the global and of the sliding layers.
    pub fn inv_freqs(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let per = self.rope_parameters.as_deref();
        let full = per.and_then(|r| r.full_attention.as_ref());
        let sliding = per.and_then(|r| r.sliding_attention.as_ref());
        let global_theta = full
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.core.rope_theta);
        let local_theta = sliding
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_local_base_freq);
        let global_scaling = if per.is_some() {
            full
        } else {
            self.rope_scaling.as_deref()
        };
        Ok((
            scaled(
                default_inv_freq(global_theta, self.core.head_dim),
                global_scaling,
            )?,
            scaled(default_inv_freq(local_theta, self.core.head_dim), sliding)?,
        ))
    }

    /// The Gemma 2 decoder config and block this config builds (validated).
    pub fn decoder(&self) -> Result<(gemma2::Config, gemma2::Block)> {
        if self.use_bidirectional_attention == Some(true) {
            return Err(EngineError::Config(
                "gemma3: use_bidirectional_attention is not supported (causal models only)".into(),
            ));
        }
        let types = self.layer_types()?;
        let cfg = gemma2::Config {
            core: self.core.clone(),
            rope_parameters: None,
            attn: gemma2::Attn {
                layer_types: Some(types.clone()),
                ..self.attn.clone()
            },
            caps: self.caps.clone(),
        };
        let rename = |e: EngineError| match e {
            EngineError::Config(m) => EngineError::Config(m.replacen("gemma2", "gemma3", 1)),
            other => other,
        };
        cfg.check().map_err(rename)?;
        let windows = cfg.windows().map_err(rename)?;
        let (rope_global, rope_local) = self.inv_freqs()?;
        let block = gemma2::Block {
            family: Family::Gemma3,
            qk_norm: true,
            sliding: types.iter().map(|t| t == "sliding_attention").collect(),
            windows,
            rope_global,
            rope_local,
        };
        Ok((cfg, block))
    }
}

/// `inv: [D/2]` with `rope_type` `default` or `linear` (`inv / factor`) applied.
fn scaled(inv: Vec<f64>, r: Option<&RopeParameters>) -> Result<Vec<f64>> {
    let Some(r) = r else { return Ok(inv) };
    r.full_rotary("gemma3")?;
    match r.kind() {
        "default" => Ok(inv),
        "linear" => {
            let factor = r.factor.filter(|f| *f > 0.0).ok_or_else(|| {
                EngineError::Config("gemma3: rope_type `linear` needs a positive `factor`".into())
            })?;
            Ok(inv.into_iter().map(|f| f / factor).collect())
        }
        other => Err(EngineError::Config(format!(
            "gemma3: rope_type `{other}` is not supported (default, linear)"
        ))),
    }
}
