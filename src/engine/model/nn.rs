//! Building blocks shared by the model families.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` have no
//! backward pass (ARCHITECTURE.md, "Ops modes"): gradients silently stop at them. By default the softmax,
//! cross-entropy, norms, RoPE, SwiGLU and linears here are this crate's own kernels with
//! a backward pass ([`super::kernels`], f32 on the CPU) or, for other dtypes and
//! devices, composed from differentiable tensor ops, so that the prefix trains through
//! them. The functions that can run another way take the pass's [`Ops`] mode
//! ([`super::Forward::ops`]): [`Ops::Fused`] switches the softmax and norms to
//! candle-nn's fused kernels (no backward pass: the historical bug `train.fused_ops`
//! reproduces); [`Ops::Composed`] turns the block ops off (the reference they are
//! tested against).

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::{kernels, weights};
use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};

/// Which kernels a forward pass runs (ARCHITECTURE.md, "Ops modes"). Carried by
/// [`super::Forward`] and handed to every function below that branches on it; the
/// others (linears, RoPE, SwiGLU, cross-entropy, heads) run the same in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    /// The crate's kernels with their own backward pass ([`kernels`], f32 on the CPU;
    /// composed differentiable ops elsewhere), Llama's attention and MLP sub-blocks as
    /// the block ops [`kernels::AttentionBlock`] and [`kernels::SwiGluMlp`] when
    /// training.
    #[default]
    Kernels,
    /// candle-nn's fused softmax and norms: no backward pass, so gradients silently stop
    /// at them. The historical "training through fused ops" bug (`train.fused_ops`,
    /// `no-grad`); no block ops.
    Fused,
    /// The crate's single kernels, the block ops composed from them (norm, projections,
    /// RoPE, attention product, SwiGLU, residual add, each a graph node of its own). The
    /// values are the same as [`Ops::Kernels`]; this is the reference the block ops'
    /// backward passes are tested against, and a way to bisect a gradient problem.
    Composed,
}

impl Ops {
    /// Whether the softmax and norms are candle-nn's fused kernels.
    fn fused(self) -> bool {
        self == Ops::Fused
    }
}

/// Whether a block op may replace the composed sub-block for `x: [..., n]` with
/// per-feature weights `ws: [n]`: the mode is [`Ops::Kernels`] and the crate's kernels
/// apply ([`own_kernel`]).
pub(crate) fn block_ops(x: &Tensor, ws: &[&Tensor], ops: Ops) -> bool {
    ops == Ops::Kernels && own_kernel(x, ws)
}

/// A frozen linear layer, `x @ w_t + b`, as every family holds its projections.
///
/// The weight is kept transposed and contiguous, `w_t: [in, out]`: a PyTorch
/// `nn.Linear` weight `[out, in]` is transposed once at load. candle's matmul (the
/// `gemm` crate) re-packs a transposed right-hand side on every call; for a decode step
/// (a few rows) that costs 5-8x the product itself (ci/bench/README.md).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`, contiguous.
    w_t: Tensor,
    /// `[out]`
    b: Option<Tensor>,
    /// `[out, in]`, contiguous: the weight the backward pass multiplies by, built by the
    /// first backward pass for a weight of at most [`Linear::BACKWARD_COPY_MAX`] values
    /// (generation never builds it). Shared by clones.
    w: Arc<OnceLock<Tensor>>,
}

impl Linear {
    /// The largest weight (in values: 16 MiB of f32) that keeps a contiguous `[out, in]`
    /// copy for the backward pass. gemm multiplies by a transposed view more slowly than
    /// by a contiguous matrix, so a copy makes every later backward pass faster; copies
    /// of every weight would double a large model's memory, so larger weights are read
    /// through strides (the measurements: ci/bench/README.md, "The M2 backward
    /// regression").
    pub const BACKWARD_COPY_MAX: usize = 4 << 20;

    /// From a PyTorch `nn.Linear` weight `w: [out, in]` and bias `b: [out]`.
    pub fn from_torch(w: &Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        Self::new(w.t()?.contiguous()?, b)
    }

    /// From a GPT-2 `Conv1D` weight `w: [in, out]` and bias `b: [out]`.
    pub fn from_conv1d(w: &Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        Self::new(w.contiguous()?, b)
    }

    fn new(w_t: Tensor, b: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Self {
            w_t,
            b: b.map(|b| b.contiguous()).transpose()?,
            w: Arc::default(),
        })
    }

    /// `[in, out]`, contiguous.
    pub(crate) fn w_t(&self) -> &Tensor {
        &self.w_t
    }

    /// `[out]`, contiguous.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    /// `x @ w_t + b`: `x: [..., in]` -> `[..., out]`.
    ///
    /// candle's matmul backward computes the gradient of both operands, so a plain
    /// `broadcast_matmul` spends as many FLOPs on gradients of the frozen weight as on
    /// the one the prefix needs, and builds them as `[batch, in, out]` before summing.
    /// Here the batch is flattened into one `[B*S, in] @ [in, out]` product and the
    /// backward pass returns the gradient of `x` only ([`kernels::FrozenLinear`]). On a
    /// shape mismatch, or off the CPU, it takes the plain path so that the error is
    /// candle's usual one.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (k, n) = self.w_t.dims2()?;
        let fits = x.dims().last() == Some(&k)
            && x.device().is_cpu()
            && x.dtype() == self.w_t.dtype()
            && self.b.as_ref().is_none_or(|b| {
                b.dims() == [n] && b.dtype() == DType::F32 && x.dtype() == DType::F32
            });
        if !fits {
            let y = x.broadcast_matmul(&self.w_t)?;
            return match &self.b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        x.contiguous()?
            .apply_op1(kernels::FrozenLinear(self.clone()))
    }

    /// The gradient of the input from the gradient of the output:
    /// `grad: [..., out]` -> `grad @ w: [..., in]` (`w: [out, in]`, see
    /// [`Linear::backward_weight`]).
    pub(crate) fn input_grad(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        input_grad_sum(&[(self, grad)])
    }

    /// `w: [out, in]` for the backward pass: the contiguous copy, made by the first call,
    /// of a weight of at most [`Linear::BACKWARD_COPY_MAX`] values; the transposed view of
    /// `w_t` (no copy) of a larger one.
    fn backward_weight(&self) -> candle_core::Result<Tensor> {
        if self.w_t.elem_count() > Self::BACKWARD_COPY_MAX {
            return self.w_t.t();
        }
        if let Some(w) = self.w.get() {
            return Ok(w.clone());
        }
        // A race only builds the same tensor twice.
        let _ = self.w.set(self.w_t.t()?.contiguous()?);
        Ok(self.w.get().expect("set above").clone())
    }
}

/// The input gradient of an activation that feeds several linears (each `in` wide):
/// `sum_i grad_i @ w_i`, `grad_i: [..., out_i]` with the same leading dimensions ->
/// `[..., in]`. gemm adds each product into the first one ([`kernels::matmul_sum`]),
/// so the sum costs no separate adds.
pub(crate) fn input_grad_sum(terms: &[(&Linear, &Tensor)]) -> candle_core::Result<Tensor> {
    let Some((first, g0)) = terms.first() else {
        candle_core::bail!("input_grad_sum: no terms")
    };
    let k = first.w_t.dim(0)?;
    let mut dims = g0.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = k;
    }
    // grad_i as [m, out_i], w_i as [out_i, in]
    let mut rows = Vec::with_capacity(terms.len());
    for (lin, grad) in terms {
        let n = lin.w_t.dim(1)?;
        let m = grad.elem_count() / n.max(1);
        rows.push((grad.contiguous()?.reshape((m, n))?, lin.backward_weight()?));
    }
    let pairs: Vec<(&Tensor, &Tensor)> = rows.iter().map(|(g, w)| (g, w)).collect();
    kernels::matmul_sum(&pairs)?.reshape(dims)
}

/// LayerNorm over the last dimension (differentiable in `x`; `w`, `b` frozen).
/// `x: [..., H]`, `w, b: [H]` -> `[..., H]`
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    ops: Ops,
) -> candle_core::Result<Tensor> {
    if ops.fused() {
        return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32);
    }
    if own_kernel(x, &[w, b]) {
        let op = kernels::Norm {
            w: w.clone(),
            b: Some(b.clone()),
            eps: eps as f32,
            centred: true,
        };
        return x.contiguous()?.apply_op1(op);
    }
    candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)
}

/// `nn.LayerNorm` with its frozen scale and bias (GPT-2, GPT-BigCode, Bloom, GPT-NeoX).
pub struct LayerNorm {
    /// `[E]`, starts at one.
    pub weight: Tensor,
    /// `[E]`
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// `{name}.weight` and `{name}.bias`, each `[e]`.
    pub fn load(vb: &VarBuilder, name: &str, e: usize, eps: f64) -> Result<Self> {
        let weight = weights::ones(vb, e, &format!("{name}.weight")).ctx(name)?;
        let bias = weights::bias(vb, e, &format!("{name}.bias")).ctx(name)?;
        Ok(Self { weight, bias, eps })
    }

    /// `x: [..., E]` -> `[..., E]`
    pub fn forward(&self, x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps, ops)
    }
}

/// The attention side of a Bloom or GPT-NeoX layer, stored alike by both (`{p}` the
/// layer, `{attn}` Bloom's `self_attention` or GPT-NeoX's `attention`): the
/// `{p}.input_layernorm` before attention, the fused `{p}.{attn}.query_key_value` with
/// per-head columns ([`super::gpt2::QkvColumns::PerHead`]), the output
/// `{p}.{attn}.dense`, and the `{p}.post_attention_layernorm` before the MLP.
pub struct FusedAttention {
    pub input_layernorm: LayerNorm,
    /// `Linear` `[E, 3E]`, columns per head `[H, 3, D]` (q, k, v of head 0, then
    /// head 1, ...)
    pub query_key_value: Linear,
    /// `Linear` `[E, E]`
    pub dense: Linear,
    pub post_attention_layernorm: LayerNorm,
}

impl FusedAttention {
    /// Layer `p`'s weights as above, hidden size `e`, LayerNorm epsilon `eps`, biases on
    /// `query_key_value` and `dense` with `bias`.
    pub fn load(
        vb: &VarBuilder,
        p: &str,
        attn: &str,
        e: usize,
        eps: f64,
        bias: bool,
    ) -> Result<Self> {
        let linear =
            |n: &str, o: usize| weights::linear(vb, &format!("{p}.{attn}.{n}"), e, o, bias);
        Ok(Self {
            input_layernorm: LayerNorm::load(vb, &format!("{p}.input_layernorm"), e, eps)?,
            query_key_value: linear("query_key_value", 3 * e)?,
            dense: linear("dense", e)?,
            post_attention_layernorm: LayerNorm::load(
                vb,
                &format!("{p}.post_attention_layernorm"),
                e,
                eps,
            )?,
        })
    }

    /// `h: [B, S, E]` -> `a = input_layernorm(h)` `[B, S, E]` and its queries, keys and
    /// values `[B, H, S, D]` each (`query_key_value(a)` `[B, S, 3E]` split per head), in
    /// mode `ops`; errors at `site`.
    pub fn normed_qkv(
        &self,
        h: &Tensor,
        (heads, d): (usize, usize),
        site: Site,
        ops: Ops,
    ) -> Result<(Tensor, [Tensor; 3])> {
        let a = self
            .input_layernorm
            .forward(h, ops)
            .at(site, "input_layernorm")?;
        let (q, k, v) = self
            .query_key_value
            .forward(&a)
            .and_then(|x| super::gpt2::QkvColumns::PerHead.split(&x, heads, d))
            .at(site, "query_key_value")?;
        Ok((a, [q, k, v]))
    }

    /// The attention output `o: [B, H, S, D]` -> `dense(merge_heads(o))` `[B, S, E]`;
    /// errors at `site`.
    pub fn output(&self, o: &Tensor, site: Site) -> Result<Tensor> {
        super::attention::merge_heads(o)
            .and_then(|o| self.dense.forward(&o))
            .at(site, "dense")
    }
}

/// RMSNorm over the last dimension (differentiable in `x`; `w` frozen).
/// `x: [..., H]`, `w: [H]` -> `[..., H]`
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, ops: Ops) -> candle_core::Result<Tensor> {
    if ops.fused() {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    if own_kernel(x, &[w]) {
        let op = kernels::Norm {
            w: w.clone(),
            b: None,
            eps: eps as f32,
            centred: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    candle_nn::ops::rms_norm_slow(x, w, eps as f32)
}

/// Whether [`kernels`] handle `x: [..., n]` with per-feature weights `ws: [n]`: f32 on
/// the CPU. Anything else takes the composed ops, whose errors are candle's usual ones.
pub(crate) fn own_kernel(x: &Tensor, ws: &[&Tensor]) -> bool {
    let n = x.dims().last().copied();
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && n.is_some_and(|n| n > 0)
        && ws.iter().all(|w| {
            w.dtype() == DType::F32 && Some(w.dims()) == n.as_ref().map(std::slice::from_ref)
        })
}

/// SwiGLU, `silu(gate) * up`, differentiable in both: `gate, up: [..., n]` -> `[..., n]`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if own_kernel(gate, &[]) && own_kernel(up, &[]) && gate.dims() == up.dims() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, kernels::SwiGlu);
    }
    gate.silu()? * up
}

/// GELU, tanh approximation (GPT-2 `gelu_new`, Bloom, `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu()
}

/// Softmax over the last dimension (differentiable, unlike `softmax_last_dim`, except
/// in [`Ops::Fused`]). `x: [..., n]` -> `[..., n]`
pub fn softmax(x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
    if ops.fused() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    if own_kernel(x, &[]) {
        let op = kernels::Softmax {
            scale: 1.0,
            adds: vec![],
        };
        return x.contiguous()?.apply_op1(op);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// `softmax(scale * scores + sum(adds))` in one differentiable kernel, when it applies:
/// f32 on the CPU, not in [`Ops::Fused`], and every add (mask, bias) broadcasts to the
/// scores' own shape. `None` otherwise: the caller then composes the ops, which also
/// report shape errors the usual way. `scores: [..., n]`, `adds[i]` broadcastable.
pub fn scaled_masked_softmax(
    scores: &Tensor,
    scale: f64,
    adds: &[&Tensor],
    ops: Ops,
) -> candle_core::Result<Option<Tensor>> {
    if !own_softmax(scores, ops) {
        return Ok(None);
    }
    let shape = scores.shape();
    let mut broadcast = vec![];
    for add in adds {
        let fits = add.dtype() == DType::F32
            && add.device().is_cpu()
            && shape
                .broadcast_shape_binary_op(add.shape(), "broadcast_add")
                .is_ok_and(|s| &s == shape);
        if !fits {
            return Ok(None);
        }
        let b = add.contiguous()?.broadcast_as(shape)?;
        if b.stride().last() != Some(&1) {
            return Ok(None);
        }
        broadcast.push(b);
    }
    let op = kernels::Softmax {
        scale: scale as f32,
        adds: broadcast,
    };
    scores.contiguous()?.apply_op1(op).map(Some)
}

/// Whether [`scaled_masked_softmax`] takes scores of `x`'s dtype and device in mode
/// `ops` (f32 on the CPU, not [`Ops::Fused`]): callers ask before they compute the
/// scores.
pub(crate) fn own_softmax(x: &Tensor, ops: Ops) -> bool {
    !ops.fused() && own_kernel(x, &[])
}

/// Cross-entropy per row: `logits: [N, V]`, one target id `< V` per row ->
/// `-log softmax(logits)[target]: [N]`, differentiable in the logits.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    if own_kernel(logits, &[]) && logits.rank() == 2 {
        let op = kernels::CrossEntropy {
            targets: targets.to_vec(),
        };
        return logits.contiguous()?.apply_op1(op);
    }
    let (n, _) = logits.dims2()?;
    let targets = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    candle_nn::ops::log_softmax(logits, D::Minus1)?
        .gather(&targets, 1)?
        .squeeze(1)?
        .neg()
}

/// Default RoPE inverse frequencies `1 / theta^(2i/d)`, `i < d/2` (f64): `[d/2]`, `d`
/// the rotated width (`head_dim`, or GPT-NeoX's rotary dimensions).
pub fn default_inv_freq(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect()
}

/// RoPE inverse frequencies `inv: [R/2]` (f64) as the tensor [`rope_tables`] takes:
/// `[1, R/2]`, f32 (as transformers computes them), on `device`.
pub fn inv_freq_tensor(inv: &[f64], device: &candle_core::Device) -> Result<Tensor> {
    let f32s: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
    Tensor::from_vec(f32s, (1, inv.len()), device).ctx("rope inv_freq")
}

/// RoPE tables for the positions `[B][S]` of each row (from
/// [`super::row_positions`]) and the inverse frequencies `inv_freq: [1, R/2]`:
/// `(cos, sin)`, each `[B, 1, S, R]` (halves repeated, transformers' `rotate_half`
/// convention), computed in f32 like transformers and returned in `dtype`. Computed
/// per pass, so no position is ever out of a table's range. `R` is the rotated width:
/// `head_dim`, or GPT-NeoX's `rotary_pct * head_dim`.
pub fn rope_tables(
    inv_freq: &Tensor,
    positions: &[Vec<u32>],
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = inv_freq.device();
    let (b, s) = (positions.len(), positions.first().map_or(0, Vec::len));
    let flat: Vec<u32> = positions.iter().flatten().copied().collect();
    // [B*S, 1] x [1, R/2] -> [B*S, R/2]
    let freqs = Tensor::from_vec(flat, (b * s, 1), dev)?
        .to_dtype(DType::F32)?
        .broadcast_mul(inv_freq)?;
    let table = |t: Tensor| -> candle_core::Result<Tensor> {
        let half = t.dim(1)?;
        Tensor::cat(&[&t, &t], 1)?
            .reshape((b, 1, s, 2 * half))?
            .to_dtype(dtype)
    };
    Ok((table(freqs.cos()?)?, table(freqs.sin()?)?))
}

/// The RoPE tables of the pass `fw` over `s` new tokens after `past` cached positions:
/// each row's positions from its attention mask ([`super::row_positions`]: real tokens
/// from P on, left padding not shifting them) through [`rope_tables`] with
/// `inv_freq: [1, R/2]`. Returns `(cos, sin)`, each `[B, 1, S, R]` in `dtype`.
pub fn pass_rope_tables(
    fw: &super::Forward,
    past: usize,
    s: usize,
    inv_freq: &Tensor,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let positions = super::row_positions(fw.mask, past, s)?;
    rope_tables_at(inv_freq, &positions, dtype)
}

/// [`rope_tables`] with its errors as diagnoses at the positions: for a model with
/// several tables per pass (Gemma 3's global and local), which reads the positions
/// `[B][S]` from the mask once.
pub fn rope_tables_at(
    inv_freq: &Tensor,
    positions: &[Vec<u32>],
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    rope_tables(inv_freq, positions, dtype).at(
        Site::new(0, Attention::SelfAttn, TensorKind::Positions),
        "rope tables",
    )
}

/// RoPE, Hugging Face convention (rotate halves), differentiable in `x`:
/// `x: [B, H, S, D]`, `cos, sin: [B, 1, S, D]` -> `[B, H, S, D]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let tables_fit = [cos, sin]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.dims().len() == 4 && t.dim(1).is_ok_and(|h| h == 1));
    if own_kernel(x, &[]) && x.rank() == 4 && tables_fit {
        let (b, _, s, d) = x.dims4()?;
        if cos.dims() == [b, 1, s, d] && sin.dims() == [b, 1, s, d] && d % 2 == 0 {
            let op = kernels::Rope {
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
            };
            return x.contiguous()?.apply_op1(op);
        }
    }
    let d = x.dim(3)?;
    let (x1, x2) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rows of `table: [V, H]` for `ids: [B, S]` -> `[B, S, H]`.
pub fn embed(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let h = table.dim(1)?;
    table
        .index_select(&ids.flatten_all()?.to_dtype(DType::U32)?, 0)?
        .reshape((b, s, h))
}

#[cfg(test)]
mod tests {
    use super::{block_ops, own_softmax, Linear, Ops};
    use candle_core::{DType, Device, Tensor};

    /// Only `Ops::Kernels` replaces the composed sub-blocks by the block ops; only
    /// `Ops::Fused` gives the softmax to candle-nn (f32 on the CPU, where the crate's
    /// kernels apply).
    #[test]
    fn each_mode_picks_its_softmax_and_block_ops() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(); // [2, 4]
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(); // [4]
        let modes = [Ops::Kernels, Ops::Fused, Ops::Composed];
        let blocks = modes.map(|ops| block_ops(&x, &[&w], ops));
        assert_eq!(blocks, [true, false, false], "block ops per mode");
        let softmax = modes.map(|ops| own_softmax(&x, ops));
        assert_eq!(softmax, [true, false, true], "the crate's softmax per mode");
        assert_eq!(Ops::default(), Ops::Kernels);
    }

    /// A weight of at most `BACKWARD_COPY_MAX` values keeps its `[out, in]` copy after
    /// the first input gradient; a larger one does not. Either way the input gradient is
    /// `grad @ w`, the same as candle's matmul by the transposed weight.
    #[test]
    fn input_grad_copies_only_small_weights() {
        let dev = Device::Cpu;
        let max = Linear::BACKWARD_COPY_MAX;
        for (out, inp, copied) in [(3, 5, true), (4, max / 4, true), (4, max / 4 + 1, false)] {
            // w: [out, in], seeded values; grad: [2, 3, out]
            let w = (Tensor::arange(0f32, (out * inp) as f32, &dev).unwrap() * 1e-3)
                .and_then(|t| t.sin())
                .and_then(|t| t.reshape((out, inp)))
                .unwrap();
            let grad = (Tensor::arange(0f32, (6 * out) as f32, &dev).unwrap() * 7e-3)
                .and_then(|t| t.cos())
                .and_then(|t| t.reshape((2, 3, out)))
                .unwrap();
            let lin = Linear::from_torch(&w, None).unwrap();
            let got = lin.input_grad(&grad).unwrap(); // [2, 3, in]
            assert_eq!(lin.w.get().is_some(), copied, "{out} x {inp}");
            let want = grad.reshape((6, out)).unwrap().matmul(&w).unwrap();
            let diff = (got.reshape((6, inp)).unwrap() - want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .unwrap();
            assert!(diff < 1e-3, "{out} x {inp}: differs by {diff}");
        }
    }
}
