//! Bloom: ALiBi position biases (no position embeddings), fused `query_key_value`
//! with per-head interleaved rows, LayerNorm after the word embeddings, tied LM head.
//! Parameter names follow `BloomForCausalLM`.
//!
//! Cache geometry: `[B, n_head, S, hidden / n_head]`. Transformers before 4.44 stored
//! keys `[B*H, D, S]` and values `[B*H, S, D]` (`cache: legacy`), and PEFT up to 0.12
//! shaped the prefix that way even for the new 4-D cache (PEFT issue 2192).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{cached_self_attention, CachedStep};
use super::gpt2;
use super::mlp::GeluMlp;
use super::nn::{embed, FusedAttention, LayerNorm, Linear};
use super::weights::{linear_params, weight};
use super::{backbone, Facts, Family, Forward, Gelu, Model, ModelGeometry};
use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};

/// `BloomConfig` (Hugging Face field names; older checkpoints spell some differently).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "gpt2::default_layer_norm_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
}

impl Config {
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/bloom.json"))
    }

    pub fn geometry(&self) -> ModelGeometry {
        gpt2::multi_head_geometry(
            self.n_layer,
            self.n_head,
            self.hidden_size,
            self.vocab_size,
            None,
        )
    }
}

struct Block {
    /// `input_layernorm`, `self_attention.{query_key_value, dense}`,
    /// `post_attention_layernorm`
    attn: FusedAttention,
    /// `dense_h_to_4h` `[E, 4E]`, `dense_4h_to_h` `[4E, E]`
    mlp: GeluMlp,
}

pub struct Bloom {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    cfg: Config,
    /// `[V, E]`, the token embeddings.
    word_embeddings: Tensor,
    word_embeddings_layernorm: LayerNorm,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Tied LM head: `Linear` `[E, V]`, `word_embeddings` transposed, no bias.
    lm_head: Linear,
    /// ALiBi slope per head, `[H]`.
    slopes: Vec<f32>,
}

/// ALiBi slopes of transformers' `build_alibi_tensor` for `n` heads.
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    let cp = 1usize << (usize::BITS - 1 - n.max(1).leading_zeros()); // largest power of 2 <= n
    let base = 2f64.powf(-(2f64.powf(-((cp as f64).log2() - 3.0))));
    let mut slopes: Vec<f64> = (1..=cp).map(|p| base.powi(p as i32)).collect();
    if cp != n {
        let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * cp as f64).log2() - 3.0))));
        let remaining = (n - cp).min(cp);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

impl Bloom {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = backbone(&vb, "transformer", "word_embeddings.weight");
        let e = cfg.hidden_size;
        let word_embeddings =
            weight(&vb, (cfg.vocab_size, e), "word_embeddings.weight").ctx("word_embeddings")?;
        let eps = cfg.layer_norm_epsilon;
        let word_embeddings_layernorm = LayerNorm::load(&vb, "word_embeddings_layernorm", e, eps)?;
        let mut blocks = vec![];
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Block {
                attn: FusedAttention::load(&vb, &p, "self_attention", e, eps, true)?,
                mlp: GeluMlp {
                    up: linear_params(&vb, &format!("{p}.mlp.dense_h_to_4h"), e, 4 * e)?,
                    down: linear_params(&vb, &format!("{p}.mlp.dense_4h_to_h"), 4 * e, e)?,
                    gelu: Gelu::Tanh,
                },
            });
        }
        let ln_f = LayerNorm::load(&vb, "ln_f", e, eps)?;
        let lm_head = Linear::from_torch(&word_embeddings, None).ctx("word_embeddings")?;
        Ok(Self {
            facts: Facts::global(Family::Bloom, cfg.geometry()),
            cfg: cfg.clone(),
            word_embeddings,
            word_embeddings_layernorm,
            blocks,
            ln_f,
            lm_head,
            slopes: alibi_slopes(cfg.n_head),
        })
    }

    /// ALiBi bias `[B, H, 1, K]` for the keys `kv_start..kv_start+K` of the padding
    /// mask `pad: [B, T]`: slope x (number of visible positions before the key), as
    /// transformers computes it from the attention mask (prefix columns included).
    fn alibi(&self, pad: &Tensor, kv_start: usize, kv_len: usize, site: Site) -> Result<Tensor> {
        let rows: Vec<Vec<f32>> = pad
            .to_dtype(DType::F32)
            .and_then(|p| p.to_vec2())
            .at(site, "alibi mask")?;
        let h = self.slopes.len();
        let b = rows.len();
        let mut data = vec![0f32; b * h * kv_len];
        for (bi, row) in rows.iter().enumerate() {
            let mut count = 0f32;
            let mut pos = vec![0f32; row.len()];
            for (j, m) in row.iter().enumerate() {
                if *m > 0.5 {
                    pos[j] = count;
                    count += 1.0;
                }
            }
            for (hi, slope) in self.slopes.iter().enumerate() {
                for ki in 0..kv_len {
                    let p = pos.get(kv_start + ki).copied().unwrap_or(0.0);
                    data[(bi * h + hi) * kv_len + ki] = slope * p;
                }
            }
        }
        Tensor::from_vec(data, (b, h, 1, kv_len), pad.device()).at(site, "alibi")
    }
}

impl Model for Bloom {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (_, past) = fw.span(ids)?;
        let g = self.cfg.geometry();
        let (heads, d) = (g.num_attention_heads, g.head_dim);
        let post_ln = self.cfg.apply_residual_connection_post_layernorm;
        let ops = fw.ops;
        // [B, S, E]
        let mut h = embed(&self.word_embeddings, ids)
            .and_then(|x| self.word_embeddings_layernorm.forward(&x, ops))
            .ctx("embeddings")?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            // a: [B, S, E]; q, k, v [B, H, S, D] each
            let (a, [q, k, v]) = blk.attn.normed_qkv(&h, (heads, d), site, ops)?;
            let residual = if post_ln { a } else { h.clone() };
            let pad = fw.mask;
            let scale = 1.0 / (d as f64).sqrt();
            // [B, H, S, D]; ALiBi [B, H, 1, K] over the keys the cache returns
            let step = CachedStep::new(fw, i, past, None);
            let o = cached_self_attention(fw, step, &q, &k, &v, scale, &mut |kv_start, kv_len| {
                self.alibi(pad, kv_start, kv_len, site).map(Some)
            })?;
            let o = blk.attn.output(&o, site)?;
            h = (o + residual).at(site, "residual")?;
            let m_in = blk
                .attn
                .post_attention_layernorm
                .forward(&h, ops)
                .at(site, "post_attention_layernorm")?;
            let residual = if post_ln { m_in.clone() } else { h.clone() };
            let m = blk.mlp.forward(&m_in).at(site, "mlp")?;
            h = (m + residual).at(site, "residual")?;
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        self.ln_f
            .forward(&fw.kept_positions(&h)?, ops)
            .and_then(|h| self.lm_head.forward(&h))
            .ctx("lm head")
    }
}

#[cfg(test)]
mod tests {
    use super::alibi_slopes;

    /// transformers: 8 heads give 2^-1 .. 2^-8; 6 heads interleave the 8-head slopes.
    #[test]
    fn alibi_slopes_follow_transformers() {
        let s8 = alibi_slopes(8);
        let want: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(s8, want);
        let s4 = alibi_slopes(4);
        assert_eq!(s4, vec![0.25, 0.0625, 0.015625, 0.00390625]);
        let s6 = alibi_slopes(6);
        assert_eq!(s6.len(), 6);
        assert_eq!(&s6[..4], &s4[..]);
        assert!(
            (s6[4] - 0.5).abs() < 1e-7 && (s6[5] - 0.125).abs() < 1e-7,
            "{s6:?}"
        );
    }
}
