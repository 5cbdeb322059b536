//! The layer ops: the [`FrozenLinear`] product, [`CrossEntropy`], the norms ([`Norm`],
//! RMSNorm or LayerNorm), [`Rope`], [`SwiGlu`] and Llama's whole MLP sub-block
//! [`SwiGluMlp`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::rows::{
    exp, gemm_batched, map_row_tasks, map_row_tasks2, output, residual, row_max, rows, sum_map,
    sum_map2, weight_values, with_values, zeros, Operand, PARALLEL_MIN,
};
use crate::engine::model::nn::{input_grad_sum, Linear};

/// A frozen linear layer's product `x @ w_t + b` ([`Linear`]): `x: [..., in]`
/// (contiguous) -> `[..., out]`. The backward pass returns the gradient of `x` only:
/// candle's matmul backward would also compute the gradient of the weight, as many
/// FLOPs again, only to throw it away. Leading dimensions are flattened inside the op
/// (one `[m, in] @ [in, out]` product) rather than by reshapes around it: every reshape
/// is one more graph node, and each node costs a zero-filled buffer and an add in
/// candle's backward pass.
pub struct FrozenLinear(pub Linear);

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = x_l.dims();
        let (k, n) = self.0.w_t().dims2()?;
        if !x_l.is_contiguous() || dims.last() != Some(&k) {
            candle_core::bail!("frozen-linear: expected a contiguous [..., {k}], got {dims:?}")
        }
        let m = dims.iter().product::<usize>() / k.max(1);
        let (x, _) = rows(x, x_l, self.name())?; // [m, k]
        let (w, w_l) = self.0.w_t().storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU")
        };
        let (w, _) = rows(w, w_l, self.name())?; // [k, n]
        let x = Operand {
            v: x,
            rs: k,
            cs: 1,
            skip: 0,
        };
        let w = Operand {
            v: w,
            rs: n,
            cs: 1,
            skip: 0,
        };
        let mut y = gemm_batched(1, (m, n, k), x, w)?; // [m, n]
        if let Some(b) = self.0.bias() {
            let (bias, b_l) = b.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(bias)) = &*bias else {
                candle_core::bail!("frozen-linear: the bias must be f32 like the input")
            };
            let bias = &bias[b_l.start_offset()..b_l.start_offset() + n];
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank >= 1: checked above") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    /// `grad: [..., out]` -> `[..., in]`.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.0.input_grad(grad).map(Some)
    }
}

/// Cross-entropy per row: `logits: [N, V]` -> `-log softmax(logits)[target]: [N]`.
/// The backward pass is `g * (softmax(logits) - onehot(target))` per row, computed
/// from the logits in one pass: no `[N, V]` log-probabilities, gather or scatter.
pub struct CrossEntropy {
    /// One target id per row, each `< V`.
    pub targets: Vec<u32>,
}

with_avx2! {
    /// Cross-entropy of rows of `v` logits: `out[r] = logsumexp(x_r) - x_r[targets[r]]`.
    pub(super) fn nll_rows(x: &[f32], v: usize, targets: &[u32], out: &mut [f32]) {
        // exp into a scratch row first: that loop vectorises, an exp inside the
        // reduction does not.
        let mut e = vec![0f32; v];
        for ((x, &t), out) in x.chunks_exact(v).zip(targets).zip(out) {
            let max = row_max(x);
            e.iter_mut().zip(x).for_each(|(e, x)| *e = exp(x - max));
            *out = max + sum_map(&e, |e| e).ln() - x[t as usize];
        }
    }
}

with_avx2! {
    /// The gradient of [`nll_rows`] scaled by `g[r]`: `g * (softmax(x_r) - onehot(t))`,
    /// with `softmax(x_r) = exp(x_r - (nll[r] + x_r[t]))`.
    pub(super) fn nll_grad_rows(x: &[f32], v: usize, targets: &[u32], g: &[f32], nll: &[f32], dx: &mut [f32]) {
        let rows = x.chunks_exact(v).zip(dx.chunks_exact_mut(v));
        for ((x, dx), ((&t, &g), &nll)) in rows.zip(targets.iter().zip(g).zip(nll)) {
            let shift = nll + x[t as usize];
            for (dx, x) in dx.iter_mut().zip(x) {
                *dx = g * exp(x - shift);
            }
            dx[t as usize] -= g;
        }
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, v) = rows(s, l, self.name())?;
        let n = x.len() / v;
        if self.targets.len() != n || self.targets.iter().any(|&t| t as usize >= v) {
            candle_core::bail!(
                "{}: {} targets (< {v}) for {n} rows",
                self.name(),
                self.targets.len()
            )
        }
        let mut nll = vec![0f32; n];
        let rows_per_task = (PARALLEL_MIN / v).max(1);
        x.par_chunks(rows_per_task * v)
            .zip(self.targets.par_chunks(rows_per_task))
            .zip(nll.par_chunks_mut(rows_per_task))
            .for_each(|((x, t), out)| nll_rows(x, v, t, out));
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    /// `grad: [N]` -> `[N, V]`. The row's `max + ln(sum(exp(x - max)))` is the forward
    /// output plus the target logit: one pass over the logits, not two.
    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        let nll = y.to_vec1::<f32>()?;
        let (x_s, x_l) = x.storage_and_layout();
        let Storage::Cpu(x_s) = &*x_s else {
            candle_core::bail!("{}: the logits are not on the CPU", self.name())
        };
        let (xv, v) = rows(x_s, x_l, self.name())?;
        let mut dx = zeros(xv.len());
        let rows_per_task = (PARALLEL_MIN / v).max(1);
        let targets = self.targets.par_chunks(rows_per_task);
        dx.par_chunks_mut(rows_per_task * v)
            .zip(xv.par_chunks(rows_per_task * v))
            .zip(
                targets
                    .zip(g.par_chunks(rows_per_task))
                    .zip(nll.par_chunks(rows_per_task)),
            )
            .for_each(|((dx, x), ((t, g), nll))| nll_grad_rows(x, v, t, g, nll, dx));
        Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
    }
}

/// RMSNorm (`centred: false`, no bias): `x / sqrt(mean(x^2) + eps) * w`, or LayerNorm
/// (`centred: true`): `(x - mean) / sqrt(var + eps) * w + b`, with a frozen weight and
/// bias `w, b: [n]`. `x: [..., n]` -> `[..., n]`.
pub struct Norm {
    pub w: Tensor,
    pub b: Option<Tensor>,
    pub eps: f32,
    pub centred: bool,
}

with_avx2! {
    /// [`Norm`] over rows of `n` values: `y = (x - mean) * r * w + b` with
    /// `r = 1 / sqrt(var + eps)` (`centred: false`: mean 0, RMSNorm).
    pub(super) fn norm_rows(x: &[f32], n: usize, w: &[f32], b: &[f32], eps: f32, centred: bool, y: &mut [f32]) {
        let nf = n as f32;
        for (x, y) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mean = if centred { sum_map(x, |v| v) / nf } else { 0.0 };
            let var = sum_map(x, |x| (x - mean) * (x - mean)) / nf;
            let r = 1.0 / (var + eps).sqrt();
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * r * w + b;
            }
        }
    }
}

with_avx2! {
    /// [`NormGrad`] over rows of `n` values (see [`Norm`]'s backward pass).
    pub(super) fn norm_grad_rows(x: &[f32], g: &[f32], n: usize, w: &[f32], eps: f32, centred: bool, dx: &mut [f32]) {
        let nf = n as f32;
        let rows = x.chunks_exact(n).zip(g.chunks_exact(n));
        for ((x, g), dx) in rows.zip(dx.chunks_exact_mut(n)) {
            let mean = if centred { sum_map(x, |v| v) / nf } else { 0.0 };
            let var = sum_map(x, |x| (x - mean) * (x - mean)) / nf;
            let r = 1.0 / (var + eps).sqrt();
            // dx holds gw = g * w for now.
            for ((dx, g), w) in dx.iter_mut().zip(g).zip(w) {
                *dx = g * w;
            }
            let mean_gw = if centred { sum_map(dx, |v| v) / nf } else { 0.0 };
            let mean_gw_xh = sum_map2(dx, x, |gw, x| gw * (x - mean) * r) / nf;
            for (dx, x) in dx.iter_mut().zip(x) {
                *dx = r * (*dx - mean_gw - (x - mean) * r * mean_gw_xh);
            }
        }
    }
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "norm-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, n) = rows(s, l, self.name())?;
        let w = weight_values(&self.w, self.name())?;
        let b = match &self.b {
            Some(b) => weight_values(b, self.name())?,
            None => vec![0.0; n],
        };
        let (eps, centred) = (self.eps, self.centred);
        let y = map_row_tasks(x, n, |_, x, y| norm_rows(x, n, &w, &b, eps, centred, y));
        Ok(output(y, l))
    }

    /// With `gw = g * w`, `r = 1 / sqrt(var + eps)` and `xh = (x - mean) * r`:
    /// `dx = r * (gw - mean(gw) - xh * mean(gw * xh))` (RMSNorm: mean = 0, and no
    /// `mean(gw)` term).
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.input_grad(x, grad, None).map(Some)
    }
}

impl Norm {
    /// The gradient of the input, plus `plus` (a residual branch's gradient) if given:
    /// `x, grad, plus: [..., n]` -> `[..., n]` ([`NormGrad`]).
    pub(super) fn input_grad(
        &self,
        x: &Tensor,
        grad: &Tensor,
        plus: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let op = NormGrad {
            w: weight_values(&self.w, "norm-grad")?,
            eps: self.eps,
            centred: self.centred,
            plus: plus.map(|p| p.contiguous()).transpose()?,
        };
        x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)
    }
}

/// The input gradient of [`Norm`], plus a residual gradient added in the same pass:
/// `(x, g)`, both `[..., n]`, `plus: [..., n]` -> `dx: [..., n]`.
struct NormGrad {
    w: Vec<f32>,
    eps: f32,
    centred: bool,
    plus: Option<Tensor>,
}

impl CustomOp2 for NormGrad {
    fn name(&self) -> &'static str {
        "norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((x, n), (g, _)) = (rows(xs, xl, self.name())?, rows(gs, gl, self.name())?);
        let (w, eps, centred) = (&self.w, self.eps, self.centred);
        let run = |plus: Option<&[f32]>| {
            map_row_tasks2(x, g, n, |first, x, g, dx| {
                norm_grad_rows(x, g, n, w, eps, centred, dx);
                if let Some(p) = plus {
                    for (dx, p) in dx.iter_mut().zip(&p[first..]) {
                        *dx += p;
                    }
                }
            })
        };
        let dx = match &self.plus {
            Some(p) if p.dims() != xl.dims() => candle_core::bail!(
                "norm-grad: the residual {:?} is not the input's {:?}",
                p.dims(),
                xl.dims()
            ),
            Some(p) => with_values(p, self.name(), |p| run(Some(p)))?,
            None => run(None),
        };
        Ok(output(dx, xl))
    }
}

/// Rotary position embedding, Hugging Face convention (rotate halves):
/// `x: [B, H, S, D]` -> `x * cos + rotate_half(x) * sin` with `rotate_half(x) = [-x2, x1]`.
/// `cos, sin: [B, 1, S, D]` contiguous f32 tables (constants: no gradient).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// RoPE's transpose on a gradient outside the graph: `grad: [B, H, S, D]` ->
    /// `[B, H, S, D]`.
    pub(super) fn transpose(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        let g = grad.contiguous()?;
        let dx = with_values(&g, "rope-grad", |g_values| {
            self.apply(g_values, g.dims(), true)
        })??;
        Tensor::from_vec(dx, g.shape(), g.device())
    }

    /// `y = x * cos + rotate_half(x) * sin` (`inverse: false`) or its transpose
    /// applied to a gradient, `dx = g * cos + rotate_half^T(g * sin)` (`inverse: true`).
    fn apply(&self, x: &[f32], dims: &[usize], inverse: bool) -> candle_core::Result<Vec<f32>> {
        let &[b, h, s, d] = dims else {
            candle_core::bail!("rope: expected [B, H, S, D], got {dims:?}")
        };
        if d % 2 != 0 || self.cos.dims() != [b, 1, s, d] || self.sin.dims() != [b, 1, s, d] {
            candle_core::bail!(
                "rope: tables {:?} / {:?} do not fit [{b}, {h}, {s}, {d}]",
                self.cos.dims(),
                self.sin.dims()
            )
        }
        // The tables are read in place (contiguous, checked by `with_values`).
        let y = with_values(&self.cos, "rope", |cos| {
            with_values(&self.sin, "rope", |sin| {
                map_row_tasks(x, d, |first, x, y| {
                    rope_rows(x, d, (h, s), first, (cos, sin), inverse, y)
                })
            })
        })??;
        Ok(y)
    }
}

with_avx2! {
    /// [`Rope`] over rows of `d` values of `[B, H, S, D]`, the first being row `first`:
    /// `y = x * cos + rotate_half(x) * sin`, or its transpose on a gradient
    /// (`inverse`). `tables = (cos, sin)`, each `[B, 1, S, D]`; `hs = (H, S)`.
    pub(super) fn rope_rows(
        x: &[f32],
        d: usize,
        hs: (usize, usize),
        first: usize,
        tables: (&[f32], &[f32]),
        inverse: bool,
        y: &mut [f32],
    ) {
        let ((h, s), (cos, sin), half) = (hs, tables, d / 2);
        for (i, (x, y)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            // row r = (bi, hi, si); the tables have no head axis.
            let r = first + i;
            let (bi, si) = (r / (h * s), r % s);
            let t = (bi * s + si) * d;
            let (c, sn) = (&cos[t..t + d], &sin[t..t + d]);
            for i in 0..half {
                let (x1, x2) = (x[i], x[i + half]);
                if inverse {
                    y[i] = x1 * c[i] + x2 * sn[i + half];
                    y[i + half] = x2 * c[i + half] - x1 * sn[i];
                } else {
                    y[i] = x1 * c[i] - x2 * sn[i];
                    y[i + half] = x2 * c[i + half] + x1 * sn[i + half];
                }
            }
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, _) = rows(s, l, self.name())?;
        Ok(output(self.apply(x, l.dims(), false)?, l))
    }

    /// `grad: [B, H, S, D]` -> `[B, H, S, D]`.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.transpose(grad).map(Some)
    }
}

/// SwiGLU, `silu(gate) * up` (Llama's MLP), differentiable in both:
/// `gate, up: [..., n]` (same shape, contiguous) -> `[..., n]`.
pub struct SwiGlu;

/// `(silu(x), d silu / dx)` with `silu(x) = x * sigmoid(x)`.
#[inline(always)]
fn silu_and_slope(x: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + exp(-x));
    (x * sig, sig * (1.0 + x * (1.0 - sig)))
}

with_avx2! {
    /// `y = silu(g) * u`, element by element.
    pub(super) fn swiglu_values(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
            *y = silu_and_slope(*g).0 * u;
        }
    }
}

with_avx2! {
    /// `du = dy * silu(g)`, `dg = dy * u * silu'(g)`, element by element.
    pub(super) fn swiglu_grad_values(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len().min(u.len()).min(dy.len()).min(dg.len()).min(du.len()) {
            let (silu, slope) = silu_and_slope(g[i]);
            du[i] = dy[i] * silu;
            dg[i] = dy[i] * u[i] * slope;
        }
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-with-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((gate, n), (up, _)) = (rows(gs, gl, self.name())?, rows(us, ul, self.name())?);
        if gl.dims() != ul.dims() {
            candle_core::bail!(
                "{}: gate {:?} and up {:?} differ",
                self.name(),
                gl.dims(),
                ul.dims()
            )
        }
        let y = map_row_tasks2(gate, up, n, |_, g, u, y| swiglu_values(g, u, y));
        Ok(output(y, gl))
    }

    /// `d gate = grad * up * silu'(gate)`, `d up = grad * silu(gate)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = swiglu_grad(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// The input gradients of [`SwiGlu`]: `gate, up, grad: [..., n]` (gate and up
/// contiguous) -> `(d gate, d up)`, each `[..., n]`.
fn swiglu_grad(gate: &Tensor, up: &Tensor, grad: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let grad = grad.contiguous()?;
    let len = gate.elem_count();
    let (mut d_gate, mut d_up) = (zeros(len), zeros(len));
    let name = "swiglu-grad";
    let chunk = PARALLEL_MIN;
    with_values(gate, name, |g| {
        with_values(up, name, |u| {
            with_values(&grad, name, |dy| {
                d_gate
                    .par_chunks_mut(chunk)
                    .zip(d_up.par_chunks_mut(chunk))
                    .zip(
                        g.par_chunks(chunk)
                            .zip(u.par_chunks(chunk))
                            .zip(dy.par_chunks(chunk)),
                    )
                    .for_each(|((dg, du), ((g, u), dy))| swiglu_grad_values(g, u, dy, dg, du))
            })
        })
    })???;
    let (shape, dev) = (gate.shape(), gate.device());
    Ok((
        Tensor::from_vec(d_gate, shape, dev)?,
        Tensor::from_vec(d_up, shape, dev)?,
    ))
}

/// Llama's whole MLP sub-block, residual included, as one graph node:
/// `x + down(silu(gate(n)) * up(n))` with `n = rms_norm(x) * norm_w`,
/// `x: [..., E]` -> `[..., E]` (gate, up: `E -> I`, down: `I -> E`), differentiable in
/// `x` (the weights are frozen).
///
/// Composed, this is seven nodes (norm, gate, up, SwiGLU, down, add and the norm
/// output's second use), and candle's backward pass gives every input of every node a
/// zero-filled buffer plus an add, on `[B*S, E]` and `[B*S, I]` tensors. Here the
/// branch is computed outside the graph by the same kernels
/// ([`GatedMlp::swiglu_residual`]); the op adds it to `x` as its output and keeps `gate(n)`
/// and `up(n)` (`[..., I]` each) for its backward pass.
///
/// [`GatedMlp::swiglu_residual`]: crate::engine::model::mlp::GatedMlp::swiglu_residual
pub struct SwiGluMlp {
    /// `[..., E]`: `down(silu(gate(n)) * up(n))`, computed outside the graph; the op's
    /// output is `x + branch`.
    pub branch: Tensor,
    /// `[..., I]`: `gate(n)` and `up(n)`.
    pub gate_out: Tensor,
    pub up_out: Tensor,
    /// The block's RMSNorm (`centred: false`, weight `[E]`).
    pub norm: Norm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl CustomOp1 for SwiGluMlp {
    fn name(&self) -> &'static str {
        "swiglu-mlp-block"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        residual(self.name(), x, l, &self.branch)
    }

    /// `da = dy @ down`, `(dg, du)` from SwiGLU, `dn = dg @ gate + du @ up`,
    /// `dx = dy + rms_norm'(x) dn`.
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?; // [..., E]
        let da = self.down.input_grad(&dy)?; // [..., I]
        let (dg, du) = swiglu_grad(&self.gate_out, &self.up_out, &da)?;
        let dn = input_grad_sum(&[(&self.gate, &dg), (&self.up, &du)])?; // [..., E]
        self.norm.input_grad(x, &dn, Some(&dy)).map(Some)
    }
}
