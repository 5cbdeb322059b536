//! GPT-BigCode (StarCoder): learned positions, multi-query attention (one KV head
//! shared by every query head), fused `c_attn` (`nn.Linear`, weights `[out, in]`),
//! tied LM head. Parameter names follow `GPTBigCodeForCausalLM`.
//!
//! Cache geometry: `[B, 1, S, n_embd / n_head]` with `multi_query` (the default),
//! `[B, n_head, S, D]` without. Older transformers stored one fused `[B, S, 2*D]`
//! tensor per layer (keys then values along the last dimension): `cache: legacy`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{cached_self_attention, merge_heads, split_heads, CachedStep};
use super::nn::{embed, gelu_tanh, layer_norm, Linear};
use super::weights::{layer_norm_params, linear_params, weight};
use super::{backbone, learned_positions, Family, Forward, Model, ModelGeometry};
use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};

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

struct Block {
    ln_1: (Tensor, Tensor),
    /// `Linear` `[E, E + 2*KVH*D]`: queries, then keys, then values (multi-query);
    /// per-head interleaved `[H, 3, D]` columns otherwise.
    c_attn: Linear,
    /// `Linear` `[E, E]`
    c_proj: Linear,
    ln_2: (Tensor, Tensor),
    /// `Linear` `[E, inner]`
    c_fc: Linear,
    /// `Linear` `[inner, E]`
    mlp_proj: Linear,
}

pub struct GptBigcode {
    cfg: Config,
    /// `[V, E]`, the token embeddings.
    wte: Tensor,
    /// `[n_positions, E]`
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    /// Tied LM head: `Linear` `[E, V]`, `wte` transposed, no bias.
    lm_head: Linear,
}

impl GptBigcode {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = backbone(&vb, "transformer", "wte.weight");
        let e = cfg.n_embd;
        let g = cfg.geometry();
        let inner = cfg.n_inner.unwrap_or(4 * e);
        let qkv_out = e + 2 * g.num_kv_heads * g.head_dim;
        let wte = weight(&vb, (cfg.vocab_size, e), "wte.weight").ctx("wte")?;
        let wpe = weight(&vb, (cfg.n_positions, e), "wpe.weight").ctx("wpe")?;
        let mut blocks = vec![];
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: layer_norm_params(&vb, &format!("{p}.ln_1"), e)?,
                c_attn: linear_params(&vb, &format!("{p}.attn.c_attn"), e, qkv_out)?,
                c_proj: linear_params(&vb, &format!("{p}.attn.c_proj"), e, e)?,
                ln_2: layer_norm_params(&vb, &format!("{p}.ln_2"), e)?,
                c_fc: linear_params(&vb, &format!("{p}.mlp.c_fc"), e, inner)?,
                mlp_proj: linear_params(&vb, &format!("{p}.mlp.c_proj"), inner, e)?,
            });
        }
        let ln_f = layer_norm_params(&vb, "ln_f", e)?;
        let lm_head = Linear::from_torch(&wte, None).ctx("wte")?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// Split the fused projection `[B, S, E + 2*KVH*D]` into q `[B, H, S, D]` and
    /// k, v `[B, KVH, S, D]`.
    fn split_qkv(&self, qkv: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let g = self.cfg.geometry();
        let (h, d, e) = (g.num_attention_heads, g.head_dim, self.cfg.n_embd);
        if self.cfg.multi_query {
            let q = split_heads(&qkv.narrow(2, 0, e)?, h, d)?;
            let k = split_heads(&qkv.narrow(2, e, d)?, 1, d)?;
            let v = split_heads(&qkv.narrow(2, e + d, d)?, 1, d)?;
            Ok((q, k, v))
        } else {
            // transformers: view(B, S, H, 3*D).transpose(1, 2).split((D, 2*D), dim=3)
            let (b, s, _) = qkv.dims3()?;
            let x = qkv.reshape((b, s, h, 3 * d))?.transpose(1, 2)?;
            Ok((
                x.narrow(3, 0, d)?,
                x.narrow(3, d, d)?,
                x.narrow(3, 2 * d, d)?,
            ))
        }
    }
}

impl Model for GptBigcode {
    fn family(&self) -> Family {
        Family::GptBigcode
    }

    fn geometry(&self) -> ModelGeometry {
        self.cfg.geometry()
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (_b, s) = ids.dims2().ctx("input ids [B, S]")?;
        let past = fw.cache.past_len();
        let g = self.cfg.geometry();
        let eps = self.cfg.layer_norm_epsilon;
        let pos = learned_positions(
            fw.mask,
            past,
            s,
            self.cfg.n_positions,
            self.cfg.n_embd,
            ids.device(),
        )?;
        // [B, S, E]
        let mut h = embed(&self.wte, ids)
            .and_then(|t| t.broadcast_add(&embed(&self.wpe, &pos)?))
            .ctx("embeddings")?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            let a = layer_norm(&h, &blk.ln_1.0, &blk.ln_1.1, eps).at(site, "ln_1")?;
            let qkv = blk.c_attn.forward(&a).at(site, "c_attn")?;
            // q [B, H, S, D], k/v [B, KVH, S, D]
            let (q, k, v) = self.split_qkv(&qkv).at(site, "split c_attn")?;
            let scale = 1.0 / (g.head_dim as f64).sqrt();
            // [B, H, S, D]
            let step = CachedStep {
                layer: i,
                past,
                window: fw.cache.window(),
            };
            let o = cached_self_attention(fw, step, &q, &k, &v, scale, &mut |_, _| Ok(None))?;
            let o = merge_heads(&o)
                .and_then(|o| blk.c_proj.forward(&o))
                .at(site, "c_proj")?;
            h = (h + o).at(site, "residual")?;
            let m = layer_norm(&h, &blk.ln_2.0, &blk.ln_2.1, eps)
                .and_then(|m| blk.c_fc.forward(&m))
                .and_then(|m| gelu_tanh(&m))
                .and_then(|m| blk.mlp_proj.forward(&m))
                .at(site, "mlp")?;
            h = (h + m).at(site, "residual")?;
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        layer_norm(&fw.kept_positions(&h)?, &self.ln_f.0, &self.ln_f.1, eps)
            .and_then(|h| self.lm_head.forward(&h))
            .ctx("lm head")
    }
}
