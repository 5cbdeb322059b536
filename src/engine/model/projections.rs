//! The attention projections of the RoPE decoders (Llama and the Llama-like families,
//! Gemma 2/3): how a layer's q/k/v/o projections and per-head q/k norms are stored and
//! loaded ([`ProjectionSpec`], [`Projections::load`]), and how they turn a layer's
//! normalised input into rotated queries and keys and the values ([`Projections::qkv`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::split_heads;
use super::nn::{rms_norm, rope, Linear, Ops};
use super::weights::{fused_linears, linear};
use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};

/// Reads a per-head norm weight `[D]` by its Hugging Face name (`vb`, name, `D`) and
/// returns the scale the norm applies, `[D]` (Qwen3: the weight; Gemma 3: `1 + w`).
pub type LoadHeadNorm = fn(&VarBuilder, &str, usize) -> Result<Tensor>;

/// How a family stores a layer's attention projections (`self_attn.*`).
pub struct ProjectionSpec {
    /// The hidden size E.
    pub hidden: usize,
    /// `(H, KVH, D)`: query heads, key/value heads, head dimension.
    pub heads: (usize, usize, usize),
    /// Biases on `q_proj`, `k_proj`, `v_proj` (`[H*D]`, `[KVH*D]`, `[KVH*D]`).
    pub qkv_bias: bool,
    /// Bias on `o_proj` (`[E]`).
    pub o_bias: bool,
    /// Phi-3: one fused `qkv_proj` `[H*D + 2*KVH*D, E]` (q, k, v along the output
    /// dimension, no bias) in place of `q_proj`, `k_proj`, `v_proj`.
    pub fused_qkv: bool,
    /// The per-head q/k norms (`q_norm`, `k_norm`, weights `[D]`) and how their weights
    /// are read, for the families that have them (Qwen3, Gemma 3).
    pub head_norm: Option<LoadHeadNorm>,
}

/// The attention projections of the RoPE decoders (Llama, Qwen2/3, Mistral, Phi-3 after
/// its fused `qkv_proj` is split, Gemma 2/3), with the per-head q/k norms of the
/// families that have them.
pub struct Projections {
    /// `Linear` `[E, H*D]`
    pub q_proj: Linear,
    /// `Linear` `[E, KVH*D]`
    pub k_proj: Linear,
    /// `Linear` `[E, KVH*D]`
    pub v_proj: Linear,
    /// `Linear` `[H*D, E]`
    pub o_proj: Linear,
    /// `[D]` each: RMSNorm weights per head over D for queries and keys, applied before
    /// RoPE (Qwen3; Gemma 3 holds `1 + w`).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// `(H, KVH, D)`: the heads [`Projections::qkv`] splits into, from the spec.
    pub heads: (usize, usize, usize),
}

/// What [`Projections::qkv`] gives: the queries, keys and values attention reads, and
/// the projected query and key heads before their norm and RoPE (what a block op's
/// backward pass goes back through).
pub struct Qkv {
    /// `[B, H, S, D]`: normalised (with q/k norms) and rotated.
    pub q: Tensor,
    /// `[B, KVH, S, D]`: normalised (with q/k norms) and rotated.
    pub k: Tensor,
    /// `[B, KVH, S, D]`
    pub v: Tensor,
    /// `q_proj(a)` as heads `[B, H, S, D]`, `k_proj(a)` as heads `[B, KVH, S, D]`.
    pub projected: (Tensor, Tensor),
}

impl Projections {
    /// The self-attention projections of the layer named `p` (`layers.{i}`) under `vb`,
    /// stored as `spec` says: `{p}.self_attn.q_proj` `[E, H*D]`, `k_proj` and `v_proj`
    /// `[E, KVH*D]` (or their fused `qkv_proj`), `o_proj` `[H*D, E]` (as `Linear`s
    /// `[in, out]`), and with [`ProjectionSpec::head_norm`] `q_norm` and `k_norm` `[D]`.
    pub fn load(vb: &VarBuilder, p: &str, spec: &ProjectionSpec) -> Result<Self> {
        let (e, (heads, kvh, d)) = (spec.hidden, spec.heads);
        let name = |n: &str| format!("{p}.self_attn.{n}");
        let attn = |n: &str, i: usize, o: usize, bias: bool| linear(vb, &name(n), i, o, bias);
        let [q_proj, k_proj, v_proj] = if spec.fused_qkv {
            fused_linears(vb, &name("qkv_proj"), e, [heads * d, kvh * d, kvh * d])?
        } else {
            [
                attn("q_proj", e, heads * d, spec.qkv_bias)?,
                attn("k_proj", e, kvh * d, spec.qkv_bias)?,
                attn("v_proj", e, kvh * d, spec.qkv_bias)?,
            ]
        };
        let head_norm = |n: &str| {
            let weight = format!("{}.weight", name(n));
            spec.head_norm.map(|load| load(vb, &weight, d)).transpose()
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj: attn("o_proj", heads * d, e, spec.o_bias)?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            heads: spec.heads,
        })
    }

    /// `a: [B, S, E]` -> q `[B, H, S, D]`, k and v `[B, KVH, S, D]` of layer `layer`'s
    /// self-attention: projected, split into [`Projections::heads`], queries and keys
    /// normalised per head (with `eps`, in mode `ops`) and rotated with `cos, sin:
    /// [B, 1, S, D]` (the new positions only: the prefix in the cache is not rotated).
    pub fn qkv(
        &self,
        a: &Tensor,
        eps: f64,
        (cos, sin): (&Tensor, &Tensor),
        layer: usize,
        ops: Ops,
    ) -> Result<Qkv> {
        let (heads, kv_heads, d) = self.heads;
        let site = |t| Site::new(layer, Attention::SelfAttn, t);
        // `proj(a)` as `n` heads `[B, n, S, D]`, and those normalised per head over D
        // with `norm` (when given) and rotated.
        let heads_of = |proj: &Linear, n: usize, norm: &Option<Tensor>| {
            let projected = split_heads(&proj.forward(a)?, n, d)?;
            let t = match norm {
                Some(w) => rms_norm(&projected, w, eps, ops)?,
                None => projected.clone(),
            };
            Ok::<_, candle_core::Error>((projected, rope(&t, cos, sin)?))
        };
        // [B, H, S, D] each
        let (q_heads, q) = heads_of(&self.q_proj, heads, &self.q_norm)
            .at(site(TensorKind::Query), "q_proj + rope")?;
        // [B, KVH, S, D] each
        let (k_heads, k) = heads_of(&self.k_proj, kv_heads, &self.k_norm)
            .at(site(TensorKind::Key), "k_proj + rope")?;
        let v = self
            .v_proj
            .forward(a)
            .and_then(|v| split_heads(&v, kv_heads, d))
            .at(site(TensorKind::Value), "v_proj")?;
        Ok(Qkv {
            q,
            k,
            v,
            projected: (q_heads, k_heads),
        })
    }
}
