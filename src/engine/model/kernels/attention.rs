//! The attention ops: [`Softmax`] (with its backward op), [`AttentionCore`] (scores,
//! softmax and weighted values as one node), Llama's whole attention sub-block
//! [`AttentionBlock`], and the head split and merge [`Heads`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::layer::{Norm, Rope};
use super::rows::{
    dot, exp, handed_over, map_row_tasks, map_row_tasks2, matmul, output, residual, row_max, rows,
    sum_map, with_values, zeros, PARALLEL_MIN,
};
use crate::engine::model::nn::{input_grad_sum, Linear};

/// Attention probabilities: `softmax(scale * x + sum(adds))` over the last dimension.
/// `x: [..., n]` contiguous; every `adds[i]` has `x`'s shape, any strides with a last
/// stride of 1 (a broadcast mask `[B, 1, S, K]` or bias `[1, H, S, K]` seen as
/// `[B, H, S, K]`). The adds are constants (masks, frozen biases): no gradient.
pub struct Softmax {
    pub scale: f32,
    pub adds: Vec<Tensor>,
}

impl Softmax {
    /// Element offset of row `r` in a strided `[..., n]` tensor (last stride 1).
    fn row_offset(l: &Layout, mut r: usize) -> usize {
        let (dims, strides) = (l.dims(), l.stride());
        let mut offset = l.start_offset();
        for i in (0..dims.len().saturating_sub(1)).rev() {
            offset += (r % dims[i]) * strides[i];
            r /= dims[i];
        }
        offset
    }
}

with_avx2! {
    /// [`Softmax`] of rows of `n` values, the first being row `first` of the scores:
    /// `y = softmax(scale * x + sum(adds))`, each add a strided `[..., n]` tensor's
    /// values and layout.
    pub(super) fn softmax_rows(
        x: &[f32],
        n: usize,
        first: usize,
        scale: f32,
        adds: &[(&[f32], &Layout)],
        y: &mut [f32],
    ) {
        for (r, (x, y)) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).enumerate() {
            for (y, x) in y.iter_mut().zip(x) {
                *y = x * scale;
            }
            for (v, layout) in adds {
                let add = &v[Softmax::row_offset(layout, first + r)..][..n];
                y.iter_mut().zip(add).for_each(|(y, a)| *y += a);
            }
            let max = row_max(y);
            y.iter_mut().for_each(|y| *y = exp(*y - max));
            let sum = sum_map(y, |v| v);
            y.iter_mut().for_each(|y| *y /= sum);
        }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n) = rows(s, l, self.name())?;
        let guards: Vec<_> = self.adds.iter().map(Tensor::storage_and_layout).collect();
        let mut adds: Vec<(&[f32], &Layout)> = vec![];
        for (storage, layout) in &guards {
            let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
                candle_core::bail!("{}: the mask and bias must be f32 on the CPU", self.name())
            };
            if layout.dims() != l.dims() || layout.stride().last() != Some(&1) {
                candle_core::bail!("{}: a mask or bias does not match the scores", self.name())
            }
            adds.push((v.as_slice(), *layout));
        }
        let scale = self.scale;
        let y = map_row_tasks(x, n, |first, x, y| {
            softmax_rows(x, n, first, scale, &adds, y)
        });
        Ok(output(y, l))
    }

    /// `dx = scale * y * (g - sum(g * y))` per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let op = SoftmaxGrad { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&grad, &op)?))
    }
}

struct SoftmaxGrad {
    scale: f32,
}

with_avx2! {
    /// [`SoftmaxGrad`] over rows of `n` values: `dx = scale * y * (g - sum(g * y))`.
    pub(super) fn softmax_grad_rows(y: &[f32], g: &[f32], n: usize, scale: f32, dx: &mut [f32]) {
        let rows = y.chunks_exact(n).zip(g.chunks_exact(n));
        for ((y, g), dx) in rows.zip(dx.chunks_exact_mut(n)) {
            let s = dot(g, y);
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = scale * y * (g - s);
            }
        }
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((y, n), (g, _)) = (rows(ys, yl, self.name())?, rows(gs, gl, self.name())?);
        let scale = self.scale;
        let dx = map_row_tasks2(y, g, n, |_, y, g, dx| softmax_grad_rows(y, g, n, scale, dx));
        Ok(output(dx, yl))
    }
}

/// Scaled dot-product attention as one graph node, for training:
/// `(q: [B, H, S, D], k: [B, KVH, K, D], v: [B, KVH, K, D])` -> `[B, H, S, D]`, with the
/// `G = H / KVH` query heads of a KV head consecutive (`[B, H, S, D]` read as
/// `[B, KVH, G*S, D]`, as `attention::sdpa` does).
///
/// `attention::sdpa` computes the output and the probabilities outside the graph; this
/// op hands the output to the graph (one copy) and keeps the probabilities for its
/// backward pass. Composed, the same product is about eight nodes (reshapes, two
/// matmuls, the softmax), each with a zero-filled gradient buffer and an add in
/// candle's backward pass, on `[B, H, S, K]` scores and probabilities.
pub struct AttentionCore {
    /// `[B, H, S, D]`
    pub out: Tensor,
    /// `[B, H, S, K]`, contiguous: `softmax(scale * q k^T + bias + mask)`.
    pub probs: Tensor,
    pub scale: f32,
}

impl CustomOp3 for AttentionCore {
    fn name(&self) -> &'static str {
        "attention-core"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        ql: &Layout,
        _k: &CpuStorage,
        _kl: &Layout,
        _v: &CpuStorage,
        _vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        handed_over(self.name(), ql.dims(), &self.out)
    }

    /// See `attention_grads`. Inputs outside the graph get no gradient.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [q.track_op(), k.track_op(), v.track_op()];
        attention_grads(&self.probs, self.scale, (q, k, v), grad, want)
    }
}

/// The gradients of attention's product `P V` with `P = softmax(scale * q k^T + ...)`
/// (the probabilities `probs: [B, H, S, K]`, contiguous), from the output's gradient
/// `grad: [B, H, S, D]`, for the inputs `want`ed: `q: [B, H, S, D]` -> `dq: [B, H, S,
/// D]`, `k, v: [B, KVH, K, D]` -> `dk, dv: [B, KVH, K, D]`. With everything grouped per
/// KV head (`[B, KVH, G*S, ..]`): `dV = P^T dO`, `dS = scale * P * (dO V^T - rowsum)`,
/// `dQ = dS K`, `dK = dS^T Q`.
#[allow(clippy::type_complexity)]
fn attention_grads(
    probs: &Tensor,
    scale: f32,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    grad: &Tensor,
    [want_q, want_k, want_v]: [bool; 3],
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    // The inputs are graph tensors; only their values are needed here (and [`matmul`]
    // takes candle's slower path for a tensor in the graph).
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let (b, h, s, d) = q.dims4()?;
    let (_, kvh, kl, _) = k.dims4()?;
    let gs = (h / kvh.max(1)) * s;
    let p = probs.reshape((b, kvh, gs, kl))?; // [B, KVH, G*S, K]
    let d_out = grad.contiguous()?.reshape((b, kvh, gs, d))?; // [B, KVH, G*S, D]
    let dv = match want_v {
        true => Some(matmul(&p.t()?, &d_out)?), // [B, KVH, K, D]
        false => None,
    };
    if !want_q && !want_k {
        return Ok((None, None, dv));
    }
    let dp = matmul(&d_out, &v.contiguous()?.t()?)?; // [B, KVH, G*S, K]
    let ds = p.apply_op2_no_bwd(&dp, &SoftmaxGrad { scale })?;
    let dq = match want_q {
        true => Some(matmul(&ds, &k.contiguous()?)?.reshape((b, h, s, d))?),
        false => None,
    };
    let dk = match want_k {
        true => {
            let q = q.contiguous()?.reshape((b, kvh, gs, d))?;
            Some(matmul(&ds.t()?, &q)?) // [B, KVH, K, D]
        }
        false => None,
    };
    Ok((dq, dk, dv))
}

/// Llama's whole attention sub-block, residual included, as one graph node when
/// training: `x + o(merge(attention(rope(q(n)), kf, vf)))` with
/// `n = rms_norm(x) * norm_w`. `x: [B, S, E]`, `kf, vf: [B, KVH, K, D]` -> `[B, S, E]`.
/// With per-head q/k norms (Qwen3, [`AttentionBlock::q_norm`], [`AttentionBlock::k_norm`])
/// the queries are `rope(q_norm(q(n)))` and the new keys `rope(k_norm(k(n)))`.
///
/// `kf` and `vf` are what the cache returned: the prefix (and cached positions), then
/// the S new keys `rope(k(n))` and values `v(n)`, which were computed from `x` outside
/// the graph. The backward pass gives `kf` and `vf` their gradient at all K positions
/// (the graph carries the prefix's rows on to the prefix), and `x` its gradient through
/// the queries, the S new keys and values, the norm and the residual.
///
/// Composed (as other families, and the fused-ops mode, still run it) this is about
/// fifteen graph nodes: the norm, three projections with head split and RoPE, the
/// attention product, the head merge, the output projection and the residual add,
/// every input with a zero-filled gradient buffer and an add in candle's backward pass.
pub struct AttentionBlock {
    /// `[B, S, E]`: `o(merge(attention(..)))`, computed outside the graph; the op's
    /// output is `x + branch`.
    pub branch: Tensor,
    /// `[B, H, S, D]`, contiguous: the rotated queries.
    pub q: Tensor,
    /// `[B, H, S, K]`, contiguous: the attention probabilities.
    pub probs: Tensor,
    pub scale: f32,
    /// The block's RMSNorm (`centred: false`, weight `[E]`).
    pub norm: Norm,
    /// The RoPE tables of the S new positions, `[B, 1, S, D]` each.
    pub rope: Rope,
    /// The per-head RMSNorm of the queries (weight `[D]`) with what it normalised,
    /// `q(n)` as heads `[B, H, S, D]`, contiguous; `None`: no query norm.
    pub q_norm: Option<(Norm, Tensor)>,
    /// The same for the new keys, `k(n)` as heads `[B, KVH, S, D]`.
    pub k_norm: Option<(Norm, Tensor)>,
    /// `E -> H*D`, `E -> KVH*D`, `E -> KVH*D`, `H*D -> E`.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

impl CustomOp3 for AttentionBlock {
    fn name(&self) -> &'static str {
        "attention-block"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        _k: &CpuStorage,
        _kl: &Layout,
        _v: &CpuStorage,
        _vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        residual(self.name(), x, xl, &self.branch)
    }

    /// `dO = split(dy @ o)`; `(dq, dkf, dvf)` from `attention_grads`; the last S rows
    /// of `dkf` and `dvf` are the new keys' and values'; `dn = q'(dq) + k'(dk) + v'(dv)`
    /// through RoPE's transpose, the q/k norms' input gradients (when given), the head
    /// merge and the projections; `dx = dy + rms_norm'(x) dn`.
    fn bwd(
        &self,
        x: &Tensor,
        kf: &Tensor,
        vf: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = x.dim(1)?;
        let (heads, kl) = (self.q.dim(1)?, kf.dim(2)?);
        let dy = dy.contiguous()?; // [B, S, E]
        let d_out = to_heads(&self.o_proj.input_grad(&dy)?, heads)?; // [B, H, S, D]
        let want = [x.track_op(), true, true];
        let (dq, dkf, dvf) =
            attention_grads(&self.probs, self.scale, (&self.q, kf, vf), &d_out, want)?;
        let (Some(dkf), Some(dvf)) = (dkf, dvf) else {
            candle_core::bail!("{}: no key or value gradient", self.name())
        };
        let dx = match dq {
            Some(dq) if kl >= s => {
                // [B, KVH, S, D] each
                let new = |g: &Tensor| g.narrow(2, kl - s, s)?.contiguous();
                // The gradient of the projected heads from that of the rotated ones:
                // RoPE's transpose, then the head norm's (when given).
                let unrotate = |g: &Tensor, norm: &Option<(Norm, Tensor)>| {
                    let g = self.rope.transpose(g)?;
                    match norm {
                        Some((norm, heads)) => norm.input_grad(heads, &g, None),
                        None => Ok(g),
                    }
                };
                let dq = from_heads(&unrotate(&dq, &self.q_norm)?)?; // [B, S, H*D]
                let dk = from_heads(&unrotate(&new(&dkf)?, &self.k_norm)?)?; // [B, S, KVH*D]
                let dv = from_heads(&new(&dvf)?)?; // [B, S, KVH*D]
                let dn = input_grad_sum(&[
                    (&self.q_proj, &dq),
                    (&self.k_proj, &dk),
                    (&self.v_proj, &dv),
                ])?; // [B, S, E]
                Some(self.norm.input_grad(x, &dn, Some(&dy))?)
            }
            Some(_) => candle_core::bail!(
                "{}: the cache returned {kl} keys, fewer than the {s} new ones",
                self.name()
            ),
            None => None,
        };
        let (kf_in, vf_in) = (kf.track_op(), vf.track_op());
        Ok((dx, kf_in.then_some(dkf), vf_in.then_some(dvf)))
    }
}

/// Head split and merge as single graph nodes (one copy each way):
/// `split: true` is `[B, S, H*D]` -> `[B, H, S, D]`, `split: false` is the inverse.
/// Composed from `reshape` + `transpose` + `contiguous` this is three nodes, each with a
/// zero-filled gradient buffer and an add in candle's backward pass.
pub struct Heads {
    pub heads: usize,
    pub split: bool,
}

impl Heads {
    /// `[B, S, H*D]` <-> `[B, H, S, D]` for contiguous f32 `x` of `dims`.
    fn permute(
        &self,
        x: &[f32],
        dims: &[usize],
        split: bool,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let h = self.heads;
        let (s, d, out): (usize, usize, Shape) = match (split, dims) {
            (true, &[b, s, hd]) if h > 0 && hd % h == 0 => (s, hd / h, (b, h, s, hd / h).into()),
            (false, &[b, hh, s, d]) if hh == h => (s, d, (b, s, h * d).into()),
            _ => candle_core::bail!(
                "heads: cannot {} {dims:?} over {h} heads",
                if split { "split" } else { "merge" }
            ),
        };
        let mut y = zeros(x.len());
        // Output rows of D values; each comes from one input row of D values.
        y.par_chunks_mut(d)
            .enumerate()
            .with_min_len((PARALLEL_MIN / d.max(1)).max(1))
            .for_each(|(r, row)| {
                let src = if split {
                    // r = (bi, hi, si) in [B, H, S] -> input (bi, si, hi) in [B, S, H].
                    let (bi, hi, si) = (r / (h * s), (r / s) % h, r % s);
                    ((bi * s + si) * h + hi) * d
                } else {
                    // r = (bi, si, hi) in [B, S, H] -> input (bi, hi, si) in [B, H, S].
                    let (bi, si, hi) = (r / (s * h), (r / h) % s, r % h);
                    ((bi * h + hi) * s + si) * d
                };
                row.copy_from_slice(&x[src..src + d]);
            });
        Ok((y, out))
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "heads-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, _) = rows(s, l, self.name())?;
        let (y, shape) = self.permute(x, l.dims(), self.split)?;
        Ok((CpuStorage::F32(y), shape))
    }

    /// The inverse permutation of the gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.apply(grad, !self.split).map(Some)
    }
}

impl Heads {
    /// The permutation outside the graph (`split`, or its inverse).
    fn apply(&self, x: &Tensor, split: bool) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let (y, shape) = with_values(&x, self.name(), |values| {
            self.permute(values, x.dims(), split)
        })??;
        Tensor::from_vec(y, shape, x.device())
    }
}

/// `[B, S, H*D]` -> `[B, H, S, D]` outside the graph.
fn to_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    Heads { heads, split: true }.apply(x, true)
}

/// `[B, H, S, D]` -> `[B, S, H*D]` outside the graph.
fn from_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let heads = x.dim(1)?;
    Heads {
        heads,
        split: false,
    }
    .apply(x, false)
}
