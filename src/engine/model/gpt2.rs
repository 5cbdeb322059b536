//! GPT-2: learned absolute positions, multi-head attention, fused `c_attn` (Conv1D,
//! weights `[in, out]`), tied LM head. Parameter names follow `GPT2LMHeadModel`.
//!
//! Cache geometry: `[B, n_head, S, n_embd / n_head]`. Positions of real tokens start
//! after the prefix, so P + S must stay below `n_positions` (PrefixTuning issue 40).
//!
//! The model here ([`Gpt2`]) is also GPT-BigCode's ([`super::gpt_bigcode`]), which
//! differs only in its projections' weight layout and in how the fused `c_attn`
//! columns hold keys and values ([`QkvColumns`]): each family's config says so in its
//! [`DecoderSpec`].

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{cached_self_attention, merge_heads, split_heads, CachedStep};
use super::mlp::GeluMlp;
use super::nn::{embed, LayerNorm, Linear};
use super::weights::{conv1d_params, weight};
use super::{backbone, row_positions, Facts, Family, Forward, Gelu, Model, ModelGeometry};
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
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_epsilon: f64,
}

impl Config {
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/gpt2.json"))
    }

    /// GPT-2's decoder: `Conv1D` projections, q|k|v columns, every head its own keys.
    pub fn decoder(&self) -> DecoderSpec {
        DecoderSpec {
            family: Family::Gpt2,
            geometry: self.geometry(),
            n_positions: self.n_positions,
            inner: self.n_inner.unwrap_or(4 * self.n_embd),
            eps: self.layer_norm_epsilon,
            columns: QkvColumns::Contiguous {
                kv_heads: self.n_head,
            },
            projection: conv1d_params,
        }
    }

    pub fn geometry(&self) -> ModelGeometry {
        multi_head_geometry(
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.vocab_size,
            Some(self.n_positions),
        )
    }
}

/// The `layer_norm_epsilon` of a GPT-2 or Bloom `config.json` without one
/// (transformers' default for both).
pub fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// The cache geometry of a decoder-only model in which every attention head has its
/// own keys and values, of `hidden_size / num_attention_heads` (GPT-2, Bloom);
/// `max_positions`: the learned position table's rows, if any.
pub fn multi_head_geometry(
    num_layers: usize,
    num_attention_heads: usize,
    hidden_size: usize,
    vocab_size: usize,
    max_positions: Option<usize>,
) -> ModelGeometry {
    ModelGeometry {
        num_layers,
        num_attention_heads,
        num_kv_heads: num_attention_heads,
        head_dim: hidden_size / num_attention_heads.max(1),
        hidden_size,
        vocab_size,
        max_positions,
        encoder_decoder: false,
    }
}

/// How the fused `c_attn` output `[B, S, E + 2*KVH*D]` holds queries, keys and values.
#[derive(Debug, Clone, Copy)]
pub enum QkvColumns {
    /// All queries, then all keys, then all values (GPT-2 with `kv_heads` = H,
    /// GPT-BigCode's multi-query with `kv_heads` = 1).
    Contiguous { kv_heads: usize },
    /// Per head `[H, 3, D]`: q, k, v of head 0, then head 1, ... (GPT-BigCode without
    /// `multi_query`; Bloom's and GPT-NeoX's `query_key_value`, with H KV heads).
    PerHead,
}

impl QkvColumns {
    /// Split `qkv: [B, S, E + 2*KVH*D]` into q `[B, H, S, D]` and k, v `[B, KVH, S, D]`.
    pub fn split(
        self,
        qkv: &Tensor,
        heads: usize,
        d: usize,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let e = heads * d;
        match self {
            Self::Contiguous { kv_heads } => {
                let kv = kv_heads * d;
                let q = split_heads(&qkv.narrow(2, 0, e)?, heads, d)?;
                let k = split_heads(&qkv.narrow(2, e, kv)?, kv_heads, d)?;
                let v = split_heads(&qkv.narrow(2, e + kv, kv)?, kv_heads, d)?;
                Ok((q, k, v))
            }
            Self::PerHead => {
                // transformers: view(B, S, H, 3*D).transpose(1, 2).split((D, 2*D), dim=3)
                let (b, s, _) = qkv.dims3()?;
                let x = qkv.reshape((b, s, heads, 3 * d))?.transpose(1, 2)?;
                Ok((
                    x.narrow(3, 0, d)?,
                    x.narrow(3, d, d)?,
                    x.narrow(3, 2 * d, d)?,
                ))
            }
        }
    }
}

/// How a family stores its projections: GPT-2's `Conv1D` (`[in, out]`) or
/// `nn.Linear` (`[out, in]`), read by name with `(name, in, out)`.
pub type LoadProjection = fn(&VarBuilder, &str, usize, usize) -> Result<Linear>;

/// What the GPT-2 decoder needs from a family's config.
pub struct DecoderSpec {
    pub family: Family,
    pub geometry: ModelGeometry,
    pub n_positions: usize,
    /// The MLP's inner width (`n_inner`, default 4E).
    pub inner: usize,
    pub eps: f64,
    pub columns: QkvColumns,
    pub projection: LoadProjection,
}

/// One GPT-2 layer: `h + attn(ln_1(h))`, then `h + mlp(ln_2(h))`.
struct Block {
    ln_1: LayerNorm,
    /// `Linear` `[E, E + 2*KVH*D]`, bias (see [`QkvColumns`])
    c_attn: Linear,
    /// `Linear` `[E, E]`, bias `[E]`
    c_proj: Linear,
    ln_2: LayerNorm,
    /// `c_fc` `[E, inner]`, `c_proj` `[inner, E]`
    mlp: GeluMlp,
}

impl Block {
    fn load(vb: &VarBuilder, p: &str, spec: &DecoderSpec) -> Result<Self> {
        let g = &spec.geometry;
        let e = g.hidden_size;
        let qkv_out = e + 2 * g.num_kv_heads * g.head_dim;
        let load = spec.projection;
        Ok(Self {
            ln_1: LayerNorm::load(vb, &format!("{p}.ln_1"), e, spec.eps)?,
            c_attn: load(vb, &format!("{p}.attn.c_attn"), e, qkv_out)?,
            c_proj: load(vb, &format!("{p}.attn.c_proj"), e, e)?,
            ln_2: LayerNorm::load(vb, &format!("{p}.ln_2"), e, spec.eps)?,
            mlp: GeluMlp {
                up: load(vb, &format!("{p}.mlp.c_fc"), e, spec.inner)?,
                down: load(vb, &format!("{p}.mlp.c_proj"), spec.inner, e)?,
                gelu: Gelu::Tanh,
            },
        })
    }
}

/// The GPT-2 decoder: token and learned position embeddings, the layers, the final
/// LayerNorm and the tied LM head.
pub struct Gpt2 {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    spec: DecoderSpec,
    /// `[V, E]`, the token embeddings.
    wte: Tensor,
    /// `[n_positions, E]`
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// Tied LM head: `Linear` `[E, V]`, `wte` transposed, no bias.
    lm_head: Linear,
}

impl Gpt2 {
    pub fn load(spec: DecoderSpec, vb: VarBuilder) -> Result<Self> {
        let vb = backbone(&vb, "transformer", "wte.weight");
        let g = &spec.geometry;
        let e = g.hidden_size;
        let wte = weight(&vb, (g.vocab_size, e), "wte.weight").ctx("wte")?;
        let wpe = weight(&vb, (spec.n_positions, e), "wpe.weight").ctx("wpe")?;
        let blocks = (0..g.num_layers)
            .map(|i| Block::load(&vb, &format!("h.{i}"), &spec))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(&vb, "ln_f", e, spec.eps)?;
        let lm_head = Linear::from_torch(&wte, None).ctx("wte")?;
        Ok(Self {
            facts: Facts::global(spec.family, spec.geometry),
            spec,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }
}

/// Position ids `[B, S]` (see [`super::row_positions`]) into a learned absolute position
/// table of `n_positions` rows of width `hidden` (GPT-2, GPT-BigCode). Positions past
/// the table are a `position` diagnosis: the P virtual tokens shift every real
/// position by P.
pub fn learned_positions(
    mask: &Tensor,
    past: usize,
    s: usize,
    n_positions: usize,
    hidden: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    use crate::engine::diagnosis::{Attention, CandleExt, Diagnosis, DiagnosisClass, TensorKind};
    let rows = row_positions(mask, past, s)?;
    let b = rows.len();
    let max = rows.iter().flatten().copied().max().unwrap_or(0) as usize;
    if max >= n_positions {
        return Err(Diagnosis::new(
            DiagnosisClass::Position,
            format!(
                "positions up to {max} (queries {past}..{}) exceed n_positions {n_positions} of the learned position table",
                past + s
            ),
        )
        .at(0, Attention::SelfAttn, TensorKind::Positions)
        .shapes(&[n_positions, hidden], &[max + 1, hidden])
        .hint("the P virtual tokens shift real positions by P: prompt + new tokens + P must fit in n_positions")
        .into());
    }
    Tensor::from_vec(
        rows.into_iter().flatten().collect::<Vec<u32>>(),
        (b, s),
        device,
    )
    .ctx("positions")
}

impl Model for Gpt2 {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    /// `ids: [B, S]` -> logits `[B, S, V]` (`[B, 1, V]` with `fw.last_only`).
    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (s, past) = fw.span(ids)?;
        let g = &self.spec.geometry;
        let (heads, d) = (g.num_attention_heads, g.head_dim);
        let ops = fw.ops;
        let pos = learned_positions(
            fw.mask,
            past,
            s,
            self.spec.n_positions,
            g.hidden_size,
            ids.device(),
        )?;
        // [B, S, E]
        let mut h = embed(&self.wte, ids)
            .and_then(|t| t.broadcast_add(&embed(&self.wpe, &pos)?))
            .ctx("embeddings")?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            let a = blk.ln_1.forward(&h, ops).at(site, "ln_1")?;
            let qkv = blk.c_attn.forward(&a).at(site, "c_attn")?;
            // q [B, H, S, D], k/v [B, KVH, S, D]
            let (q, k, v) = self
                .spec
                .columns
                .split(&qkv, heads, d)
                .at(site, "split c_attn")?;
            let scale = 1.0 / (d as f64).sqrt();
            let step = CachedStep::new(fw, i, past, None);
            // [B, H, S, D]
            let o = cached_self_attention(fw, step, &q, &k, &v, scale, &mut |_, _| Ok(None))?;
            let o = merge_heads(&o)
                .and_then(|o| blk.c_proj.forward(&o))
                .at(site, "c_proj")?;
            h = (h + o).at(site, "residual")?;
            let m = blk
                .ln_2
                .forward(&h, ops)
                .and_then(|m| blk.mlp.forward(&m))
                .at(site, "mlp")?;
            h = (h + m).at(site, "residual")?;
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        self.ln_f
            .forward(&fw.kept_positions(&h)?, ops)
            .and_then(|h| self.lm_head.forward(&h))
            .ctx("lm head")
    }
}
