//! GPT-2: learned absolute positions, multi-head attention, fused `c_attn` (Conv1D,
//! weights `[in, out]`), tied LM head. Parameter names follow `GPT2LMHeadModel`.
//!
//! Cache geometry: `[B, n_head, S, n_embd / n_head]`. Positions of real tokens start
//! after the prefix, so P + S must stay below `n_positions` (PrefixTuning issue 40).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{cached_self_attention, merge_heads, split_heads, CachedStep};
use super::nn::{embed, gelu_tanh, layer_norm, Linear};
use super::weights::{conv1d_params, layer_norm_params, weight};
use super::{backbone, learned_positions, Family, Forward, Model, ModelGeometry};
use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};

/// `GPT2Config` (Hugging Face field names).
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
}

fn default_eps() -> f64 {
    1e-5
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
        }
    }

    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.n_layer,
            num_attention_heads: self.n_head,
            num_kv_heads: self.n_head,
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
    /// `Linear` `[E, 3E]`, bias `[3E]`
    c_attn: Linear,
    /// `Linear` `[E, E]`, bias `[E]`
    c_proj: Linear,
    ln_2: (Tensor, Tensor),
    /// `Linear` `[E, inner]`, bias `[inner]`
    c_fc: Linear,
    /// `Linear` `[inner, E]`, bias `[E]`
    mlp_proj: Linear,
}

pub struct Gpt2 {
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

impl Gpt2 {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = backbone(&vb, "transformer", "wte.weight");
        let e = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * e);
        let wte = weight(&vb, (cfg.vocab_size, e), "wte.weight").ctx("wte")?;
        let wpe = weight(&vb, (cfg.n_positions, e), "wpe.weight").ctx("wpe")?;
        let mut blocks = vec![];
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: layer_norm_params(&vb, &format!("{p}.ln_1"), e)?,
                c_attn: conv1d_params(&vb, &format!("{p}.attn.c_attn"), e, 3 * e)?,
                c_proj: conv1d_params(&vb, &format!("{p}.attn.c_proj"), e, e)?,
                ln_2: layer_norm_params(&vb, &format!("{p}.ln_2"), e)?,
                c_fc: conv1d_params(&vb, &format!("{p}.mlp.c_fc"), e, inner)?,
                mlp_proj: conv1d_params(&vb, &format!("{p}.mlp.c_proj"), inner, e)?,
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
}

impl Model for Gpt2 {
    fn family(&self) -> Family {
        Family::Gpt2
    }

    fn geometry(&self) -> ModelGeometry {
        self.cfg.geometry()
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (_b, s) = ids.dims2().ctx("input ids [B, S]")?;
        let past = fw.cache.past_len();
        let (e, heads) = (self.cfg.n_embd, self.cfg.n_head);
        let d = e / heads;
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
            // [B, H, S, D] each
            let q = qkv
                .narrow(2, 0, e)
                .and_then(|t| split_heads(&t, heads, d))
                .at(site, "q")?;
            let k = qkv
                .narrow(2, e, e)
                .and_then(|t| split_heads(&t, heads, d))
                .at(site, "k")?;
            let v = qkv
                .narrow(2, 2 * e, e)
                .and_then(|t| split_heads(&t, heads, d))
                .at(site, "v")?;
            let scale = 1.0 / (d as f64).sqrt();
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
