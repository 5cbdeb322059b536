//! CPU kernels with their own backward pass, for the hot spots of prefix training.
//!
//! candle's composed ops (`softmax`, `log_softmax` + `gather`, `rms_norm_slow`,
//! `layer_norm_slow`, RoPE's narrow/neg/cat/mul, reshape + transpose + contiguous)
//! train correctly but cost 3-7 tensor ops each, every one with its own buffer and, in
//! the backward pass, more ops plus a zero-filled gradient buffer per input. candle-nn's
//! fused kernels are fast but have no backward pass (gradients silently stop there,
//! ARCHITECTURE.md). These are fused *and* differentiable: one pass over the rows forward, one
//! backward, in f32, parallel over rows.
//!
//! The ops work on rows (the last dimension) of contiguous f32 CPU tensors; the callers
//! in [`super::nn`] and [`super::attention`] check that and fall back to the composed
//! ops otherwise. Each op's shapes are on its struct. Three ops are whole blocks, used
//! only when training: [`AttentionCore`] (scores, softmax, weighted values, every
//! family), [`AttentionBlock`] and [`SwiGluMlp`] (Llama's attention and MLP sub-blocks
//! with their residuals); their forward pass is computed outside the graph by the same
//! kernels, and they bring their own backward pass. Products outside the graph call
//! gemm directly (`matmul`, `matmul_sum`): no zero-filled output, per-head products
//! in parallel. The hottest row loops are `with_avx2!` functions, built twice (baseline
//! x86-64 and AVX2, same bits) and chosen at run time.
//! Norm weights and biases are frozen base weights: no gradient flows to them (the
//! prefix is the only trainable parameter in this crate).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::nn::{input_grad_sum, Linear};

/// Below this many elements a kernel runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// The f32 values of a contiguous CPU tensor argument, and its last dimension.
fn rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32, got {:?}", s.dtype())
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor")
    };
    let n = l.dims().last().copied().unwrap_or(1).max(1);
    Ok((&v[start..end], n))
}

/// `f` over the f32 values of a contiguous CPU tensor, read in place (no copy).
fn with_values<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor")
    };
    let (values, _) = rows(cpu, layout, op)?;
    Ok(f(values))
}

/// The f32 values of a frozen weight `[n]`.
fn weight_values(w: &Tensor, op: &str) -> candle_core::Result<Vec<f32>> {
    w.flatten_all()
        .and_then(|w| w.to_vec1::<f32>())
        .map_err(|e| candle_core::Error::Msg(format!("{op}: weight: {e}")))
}

/// `len` zeros, written by the pool's threads when there are many: a kernel's output
/// buffer. `vec![0.0; len]` fills it on the calling thread, serial work that showed up
/// as a tenth of the main thread's time in a training step.
fn zeros(len: usize) -> Vec<f32> {
    if len < PARALLEL_MIN {
        return vec![0f32; len];
    }
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(PARALLEL_MIN)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the chunks cover all `len` values, and each was written just above.
    unsafe { out.set_len(len) };
    out
}

/// `f(first_row, rows_in, rows_out)` over tasks of whole rows of `n` values (about
/// [`PARALLEL_MIN`] values each), in parallel when the input is large; returns the
/// output. `f` is a `with_avx2!` row kernel.
fn map_row_tasks(
    input: &[f32],
    n: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = zeros(input.len());
    if input.len() < PARALLEL_MIN {
        f(0, input, &mut out);
    } else {
        let rows_per_task = (PARALLEL_MIN / n).max(1);
        input
            .par_chunks(rows_per_task * n)
            .zip(out.par_chunks_mut(rows_per_task * n))
            .enumerate()
            .for_each(|(task, (xs, ys))| f(task * rows_per_task, xs, ys));
    }
    out
}

/// [`map_row_tasks`] over two inputs of the same shape:
/// `f(first_value, rows_a, rows_b, rows_out)`, `first_value` the offset of the task's
/// first value.
fn map_row_tasks2(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = zeros(a.len());
    if a.len() < PARALLEL_MIN {
        f(0, a, b, &mut out);
    } else {
        let per_task = (PARALLEL_MIN / n).max(1) * n;
        a.par_chunks(per_task)
            .zip(b.par_chunks(per_task))
            .zip(out.par_chunks_mut(per_task))
            .enumerate()
            .for_each(|(task, ((a, b), ys))| f(task * per_task, a, b, ys));
    }
    out
}

/// One operand of [`gemm_batched`]: f32 values read as `[batches, rows, cols]` with a
/// row stride, a column stride, and the offset between batches (0: one matrix shared by
/// every batch).
#[derive(Clone, Copy)]
struct Operand<'a> {
    v: &'a [f32],
    rs: usize,
    cs: usize,
    skip: usize,
}

impl Operand<'_> {
    /// Whether `batches` matrices of `rows x cols` lie within the values.
    fn fits(&self, batches: usize, rows: usize, cols: usize) -> bool {
        let last = self.skip * (batches - 1) + self.rs * (rows - 1) + self.cs * (cols - 1);
        last < self.v.len()
    }
}

/// One gemm product of batch `i`: `dst = a[i] @ b[i]`, or `dst += a[i] @ b[i]` when
/// `accumulate`; `[m, k] @ [k, n]`, `dst` contiguous `[m, n]`.
///
/// # Safety
///
/// The operands must [`Operand::fits`] `i + 1` batches; `dst` must point to `m * n`
/// values that nothing else accesses during the call, initialised when `accumulate`.
unsafe fn gemm_one(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    (a, b): (Operand, Operand),
    i: usize,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        a.v.as_ptr().add(i * a.skip),
        a.cs as isize,
        a.rs as isize,
        b.v.as_ptr().add(i * b.skip),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// One gemm product split over all of rayon's threads (none to split over with one).
fn all_threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    }
}

/// `batches` products `a[i] @ b[i]`, `[m, k] @ [k, n]`, into a new contiguous
/// `[batches, m, n]`, through the `gemm` crate directly.
///
/// candle's matmul first zero-fills its output on the calling thread: serial work
/// (about a tenth of a training step's wall time went to such fills) in a step that is
/// otherwise parallel. Here gemm writes every output value without reading it, so the
/// buffer is never filled. Many batches (attention's per-head products) run in
/// parallel, one single-threaded gemm each, instead of one after another with every
/// product split across the threads.
fn gemm_batched(
    batches: usize,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
) -> candle_core::Result<Vec<f32>> {
    let len = batches * m * n;
    if len == 0 || k == 0 {
        return Ok(vec![0f32; len]);
    }
    if !a.fits(batches, m, k) || !b.fits(batches, k, n) {
        candle_core::bail!("matmul: [{batches}, {m}, {k}] @ [{k}, {n}] reads past an operand")
    }
    let threads = rayon::current_num_threads();
    let product = |i: usize, dst: *mut f32, parallelism: gemm::Parallelism| {
        // SAFETY: `fits` checked that every value gemm reads lies within the operands;
        // `dst` points to `m * n` values of the output that only this call writes, and
        // without `accumulate` gemm writes each of them without reading it.
        unsafe { gemm_one(dst, (m, n, k), (a, b), i, false, parallelism) }
    };
    let mut out = Vec::<f32>::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    if batches >= 2 * threads && threads > 1 {
        dst.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, c)| product(i, c.as_mut_ptr().cast(), gemm::Parallelism::None));
    } else {
        for (i, c) in dst.chunks_mut(m * n).enumerate() {
            product(i, c.as_mut_ptr().cast(), all_threads());
        }
    }
    // SAFETY: the chunks cover all `len` values and gemm wrote each of them.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// A matmul operand from an f32 CPU tensor outside the graph, `[..., rows, cols]`:
/// `(batches, rows, cols, operand)` when its leading dimensions collapse to one batch
/// stride; `None` otherwise.
fn operand<'a>(
    t: &Tensor,
    s: &'a CpuStorage,
    l: &Layout,
) -> Option<(usize, usize, usize, Operand<'a>)> {
    let CpuStorage::F32(v) = s else { return None };
    let (dims, stride) = (l.dims(), l.stride());
    let r = dims.len();
    if r < 2 || t.track_op() {
        return None;
    }
    let batches: usize = dims[..r - 2].iter().product();
    // The leading dimensions must step by one stride: each one's stride is the
    // next one's times its size (size-1 dimensions excepted).
    let mut skip = None;
    for i in (0..r - 2).rev() {
        if dims[i] == 1 {
            continue;
        }
        match skip {
            None => skip = Some((stride[i], dims[i])),
            Some((st, count)) if stride[i] == st * count => skip = Some((st, count * dims[i])),
            Some(_) => return None,
        }
    }
    let op = Operand {
        v: &v[l.start_offset()..],
        rs: stride[r - 2],
        cs: stride[r - 1],
        skip: skip.map_or(0, |(st, _)| st),
    };
    Some((batches, dims[r - 2], dims[r - 1], op))
}

/// `a @ b` outside the graph: `a: [..., M, K]` and `b: [..., K, N]` with the same
/// leading dimensions, or `b: [K, N]` shared by all -> `[..., M, N]`, contiguous.
/// Through [`gemm_batched`] when both are f32 CPU tensors whose leading dimensions
/// collapse to one batch stride (contiguous batches, any strides within a matrix);
/// candle's matmul otherwise, which also reports shape errors.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&*sa, &*sb) else {
        return a.matmul(b);
    };
    let (Some((ba, m, k, oa)), Some((bb, kb, n, mut ob))) =
        (operand(a, ca, la), operand(b, cb, lb))
    else {
        return a.matmul(b);
    };
    let shared = b.rank() == 2;
    if kb != k || !(bb == ba && b.dims()[..b.rank() - 2] == a.dims()[..a.rank() - 2] || shared) {
        return a.matmul(b);
    }
    if shared {
        ob.skip = 0;
    }
    let values = gemm_batched(ba, (m, n, k), oa, ob)?;
    let mut dims = a.dims().to_vec();
    *dims.last_mut().expect("rank >= 2") = n;
    drop((sa, sb));
    Tensor::from_vec(values, dims, a.device())
}

/// `sum_i a_i @ b_i` outside the graph, `a_i: [m, k_i]`, `b_i: [k_i, n]` -> `[m, n]`
/// contiguous: the input gradient of an activation that feeds several linears. gemm
/// writes the first product and adds the others into it (`dst += a b`): no zero-fill
/// and no separate adds. For operands it cannot take (see [`matmul`]), the products
/// are added the usual way.
pub(crate) fn matmul_sum(terms: &[(&Tensor, &Tensor)]) -> candle_core::Result<Tensor> {
    let Some(&(a0, b0)) = terms.first() else {
        candle_core::bail!("matmul_sum: no terms")
    };
    let (m, n) = (a0.dim(0)?, b0.dim(1)?);
    let guards: Vec<_> = terms
        .iter()
        .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()))
        .collect();
    // (k_i, a_i, b_i) for every term gemm can take, `None` if one it cannot.
    let operands: Option<Vec<_>> = guards
        .iter()
        .zip(terms)
        .map(|(((sa, la), (sb, lb)), (a, b))| {
            let (Storage::Cpu(ca), Storage::Cpu(cb)) = (&**sa, &**sb) else {
                return None;
            };
            match (operand(a, ca, la), operand(b, cb, lb)) {
                (Some((1, am, k, oa)), Some((1, kb, bn, ob)))
                    if (am, bn) == (m, n) && kb == k && k > 0 =>
                {
                    (oa.fits(1, m, k) && ob.fits(1, k, n)).then_some((k, oa, ob))
                }
                _ => None,
            }
        })
        .collect();
    let Some(operands) = operands.filter(|_| m * n > 0) else {
        drop(guards);
        let mut sum = matmul(a0, b0)?;
        for (a, b) in &terms[1..] {
            sum = (sum + matmul(a, b)?)?;
        }
        return Ok(sum);
    };
    let parallelism = all_threads();
    let mut out = Vec::<f32>::with_capacity(m * n);
    for (i, &(k, oa, ob)) in operands.iter().enumerate() {
        // SAFETY: each pair fits (checked above); `out` has room for `m * n` values that
        // only this call touches; the first call writes all of them (`accumulate:
        // false`) before the later ones read them.
        unsafe { gemm_one(out.as_mut_ptr(), (m, n, k), (oa, ob), 0, i > 0, parallelism) };
        if i == 0 {
            // SAFETY: the first product wrote all `m * n` values.
            unsafe { out.set_len(m * n) };
        }
    }
    drop(guards);
    Tensor::from_vec(out, (m, n), a0.device())
}

fn output(values: Vec<f32>, l: &Layout) -> (CpuStorage, Shape) {
    (CpuStorage::F32(values), l.shape().clone())
}

/// The forward pass of a residual block op ([`AttentionBlock`], [`SwiGluMlp`]):
/// `x + branch`, the branch (`[..., E]`, like `x`) computed outside the graph from the
/// same `x`. The sum is written straight into the op's output, in parallel: no separate
/// add and copy.
fn residual(
    op: &str,
    x: &CpuStorage,
    xl: &Layout,
    branch: &Tensor,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if xl.dims() != branch.dims() {
        candle_core::bail!(
            "{op}: input {:?} is not the one of the branch {:?}",
            xl.dims(),
            branch.dims()
        )
    }
    let (x, n) = rows(x, xl, op)?;
    let y = with_values(&branch.contiguous()?, op, |b| {
        map_row_tasks2(x, b, n, |_, x, b, y| {
            for ((y, x), b) in y.iter_mut().zip(x).zip(b) {
                *y = x + b;
            }
        })
    })?;
    Ok(output(y, xl))
}

/// The forward pass of [`AttentionCore`]: its output `y` was computed outside the graph
/// from the same input, so the op only copies it into the graph, after checking that
/// the input (`[B, H, S, D]`, the output's shape) is the one `y` was computed for.
fn handed_over(op: &str, input: &[usize], y: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    if input != y.dims() {
        candle_core::bail!(
            "{op}: input {input:?} is not the one of the output {:?}",
            y.dims()
        )
    }
    let values = with_values(&y.contiguous()?, op, <[f32]>::to_vec)?;
    Ok((CpuStorage::F32(values), y.shape().clone()))
}

/// Accumulators of the row reductions below. An ordered f32 fold cannot be vectorised
/// (each add waits for the previous one); `LANES` interleaved partial results, combined
/// in a fixed order, can, and give the same bits on every platform (the compiler never
/// reorders float operations itself).
const LANES: usize = 8;

/// The partial results of a reduction, combined pairwise in a fixed order.
#[inline(always)]
fn combine(acc: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    op(
        op(op(acc[0], acc[4]), op(acc[1], acc[5])),
        op(op(acc[2], acc[6]), op(acc[3], acc[7])),
    )
}

/// `sum(f(x_i))` over a row.
#[inline(always)]
fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    combine(acc, |a, b| a + b) + tail
}

/// `sum(f(a_i, b_i))` over two rows of the same length.
#[inline(always)]
fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    combine(acc, |a, b| a + b) + tail
}

/// The largest value of a row (`-inf` for an empty row).
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    combine(acc, f32::max).max(tail)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_map2(a, b, |a, b| a * b)
}

/// `e^x` in f32 from IEEE basic operations only: the same bits on every platform (libm's
/// `expf` differs between glibc, MSVC and Apple), and a branch-free body the compiler
/// vectorises in the kernels' loops (libm's scalar `expf` was 7% of a training step).
/// Range reduction `x = k ln2 + r`, |r| <= ln2 / 2, then Cephes' degree-5 polynomial
/// for `e^r` (relative error about 1e-7) and `2^k` built from its exponent bits.
/// Below -87.3 (where `e^x` leaves the normal f32 range) the result is 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.7);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let two_k = f32::from_bits(((k as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        er * two_k
    }
}

/// `fn name(args) body`, compiled twice: for baseline x86-64 (the crate's target, SSE2)
/// and with AVX2 enabled, the AVX2 build picked at run time when the CPU has it (8-wide
/// vectors in the row loops instead of 4-wide). The body must return `()`, and its
/// float loops may call only `#[inline(always)]` helpers (`exp`, `row_max`, `sum_map`,
/// `dot`): a call that is not inlined runs in the baseline build. The two builds give
/// the same bits: Rust never contracts or reorders float operations, only the vector
/// width changes.
macro_rules! with_avx2 {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { $name::avx2($($arg),*) };
            }
            $name::baseline($($arg),*)
        }

        /// The two builds of the function of the same name (tests compare them).
        mod $name {
            #[allow(unused_imports)] // a body may need nothing from the module
            use super::*;

            #[inline(always)]
            pub(super) fn baseline($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            pub(super) unsafe fn avx2($($arg: $ty),*) {
                baseline($($arg),*)
            }
        }
    };
}

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
    fn softmax_rows(
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
    fn softmax_grad_rows(y: &[f32], g: &[f32], n: usize, scale: f32, dx: &mut [f32]) {
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
    /// through RoPE's transpose, the head merge and the projections;
    /// `dx = dy + rms_norm'(x) dn`.
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
                let dq = from_heads(&self.rope.transpose(&dq)?)?; // [B, S, H*D]
                let dk = from_heads(&self.rope.transpose(&new(&dkf)?)?)?; // [B, S, KVH*D]
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

/// Cross-entropy per row: `logits: [N, V]` -> `-log softmax(logits)[target]: [N]`.
/// The backward pass is `g * (softmax(logits) - onehot(target))` per row, computed
/// from the logits in one pass: no `[N, V]` log-probabilities, gather or scatter.
pub struct CrossEntropy {
    /// One target id per row, each `< V`.
    pub targets: Vec<u32>,
}

with_avx2! {
    /// Cross-entropy of rows of `v` logits: `out[r] = logsumexp(x_r) - x_r[targets[r]]`.
    fn nll_rows(x: &[f32], v: usize, targets: &[u32], out: &mut [f32]) {
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
    fn nll_grad_rows(x: &[f32], v: usize, targets: &[u32], g: &[f32], nll: &[f32], dx: &mut [f32]) {
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
    fn norm_rows(x: &[f32], n: usize, w: &[f32], b: &[f32], eps: f32, centred: bool, y: &mut [f32]) {
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
    fn norm_grad_rows(x: &[f32], g: &[f32], n: usize, w: &[f32], eps: f32, centred: bool, dx: &mut [f32]) {
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
    fn input_grad(
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
    fn transpose(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
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
    fn rope_rows(
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
    fn swiglu_values(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
            *y = silu_and_slope(*g).0 * u;
        }
    }
}

with_avx2! {
    /// `du = dy * silu(g)`, `dg = dy * u * silu'(g)`, element by element.
    fn swiglu_grad_values(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
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
/// ([`super::nn::swiglu_mlp`]); the op adds it to `x` as its output and keeps `gate(n)`
/// and `up(n)` (`[..., I]` each) for its backward pass.
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

#[cfg(test)]
mod tests {
    use super::{
        dot, exp, nll_grad_rows, nll_rows, norm_grad_rows, norm_rows, rope_rows, row_max,
        softmax_grad_rows, softmax_rows, sum_map, swiglu_grad_values, swiglu_values,
    };
    use candle_core::{Device, Layout, Tensor};

    /// `dims` of deterministic values in [-1, 1], `seed` shifting the sequence.
    fn values(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap()
    }

    /// [`super::matmul`] (gemm without a zero-filled output, batches in parallel) gives
    /// candle's matmul values: batched, with transposed operands (strided rows and
    /// columns), a right-hand side shared by every batch (2-D, or broadcast with batch
    /// stride 0), and more batches than threads (one single-threaded gemm each) as well
    /// as fewer.
    #[test]
    fn gemm_matmul_matches_candle_matmul_on_batched_transposed_and_shared_operands() {
        let t = values;
        let cases: Vec<(Tensor, Tensor)> = vec![
            (t(&[2, 3, 5, 4], 1.0), t(&[2, 3, 4, 6], 2.0)),
            (t(&[8, 3, 5, 4], 1.0), t(&[8, 3, 4, 6], 2.0)),
            (t(&[2, 3, 5, 4], 1.0), t(&[2, 3, 6, 4], 2.0).t().unwrap()),
            (t(&[9, 4, 5], 1.0).t().unwrap(), t(&[9, 4, 6], 2.0)),
            (t(&[7, 4], 1.0), t(&[4, 3], 2.0)),
            (t(&[2, 5, 4], 1.0), t(&[4, 6], 2.0)),
            (
                t(&[1, 33, 64], 3.0),
                t(&[64, 40], 4.0).t().unwrap().t().unwrap(),
            ),
            (
                t(&[2, 3, 5, 4], 1.0),
                t(&[4, 6], 2.0).broadcast_as((2, 3, 4, 6)).unwrap(),
            ),
        ];
        for (a, b) in &cases {
            let ours = super::matmul(a, b).unwrap();
            let d = max_abs_diff(&ours, &a.broadcast_matmul(b).unwrap());
            assert!(d <= 1e-5, "{:?} @ {:?}: differs by {d}", a.dims(), b.dims());
        }
    }

    /// [`super::matmul_sum`] (gemm adding each product into the first) gives the sum of
    /// candle's products, for contiguous and transposed operands of different inner
    /// sizes, and for one term.
    #[test]
    fn gemm_matmul_sum_matches_the_sum_of_candle_products() {
        let t = values;
        let (a1, b1) = (t(&[37, 16], 1.0), t(&[16, 24], 2.0));
        let (a2, b2) = (t(&[37, 5], 3.0), t(&[24, 5], 4.0).t().unwrap());
        let (a3, b3) = (t(&[9, 37], 5.0).t().unwrap(), t(&[9, 24], 6.0));
        let product = |a: &Tensor, b: &Tensor| a.matmul(b).unwrap();
        let ours = super::matmul_sum(&[(&a1, &b1), (&a2, &b2), (&a3, &b3)]).unwrap();
        let theirs =
            ((product(&a1, &b1) + product(&a2, &b2)).unwrap() + product(&a3, &b3)).unwrap();
        assert_eq!(ours.dims(), [37, 24]);
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= 1e-5, "three terms differ by {d}");
        let one = super::matmul_sum(&[(&a1, &b1)]).unwrap();
        let d = max_abs_diff(&one, &product(&a1, &b1));
        assert!(d <= 1e-5, "one term differs by {d}");
    }

    /// The AVX2 build of each `with_avx2!` kernel gives the same bits as the baseline
    /// build (run where the CPU has AVX2; elsewhere only the baseline exists).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_builds_of_the_row_kernels_give_the_same_bits_as_the_baseline() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let (rows, v) = (6, 37); // a row length with a tail after the 8-wide lanes
        let x: Vec<f32> = (0..rows * v)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
            .collect();
        let targets: Vec<u32> = (0..rows as u32).map(|r| r * 5 % v as u32).collect();
        let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
        nll_rows::baseline(&x, v, &targets, &mut a);
        unsafe { nll_rows::avx2(&x, v, &targets, &mut b) };
        assert_eq!(a, b, "nll_rows");
        let g: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32).collect();
        let (mut da, mut db) = (vec![0f32; rows * v], vec![0f32; rows * v]);
        nll_grad_rows::baseline(&x, v, &targets, &g, &a, &mut da);
        unsafe { nll_grad_rows::avx2(&x, v, &targets, &g, &a, &mut db) };
        assert_eq!(da, db, "nll_grad_rows");
        let mask: Vec<f32> = (0..rows * v)
            .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let layout = Layout::contiguous((rows, v));
        let (mut sa, mut sb) = (vec![0f32; rows * v], vec![0f32; rows * v]);
        softmax_rows::baseline(&x, v, 0, 0.3, &[(&mask, &layout)], &mut sa);
        unsafe { softmax_rows::avx2(&x, v, 0, 0.3, &[(&mask, &layout)], &mut sb) };
        assert_eq!(sa, sb, "softmax_rows");
        assert!(sa.iter().all(|p| p.is_finite()) && sa.contains(&0.0));
        let (u, dy) = (&sa, &da); // any values of the same length
        let (mut ya, mut yb) = (vec![0f32; rows * v], vec![0f32; rows * v]);
        swiglu_values::baseline(&x, u, &mut ya);
        unsafe { swiglu_values::avx2(&x, u, &mut yb) };
        assert_eq!(ya, yb, "swiglu_values");
        let mut grads: Vec<Vec<f32>> = vec![vec![0f32; rows * v]; 4];
        let [dga, dua, dgb, dub] = &mut grads[..] else {
            unreachable!()
        };
        swiglu_grad_values::baseline(&x, u, dy, dga, dua);
        unsafe { swiglu_grad_values::avx2(&x, u, dy, dgb, dub) };
        assert_eq!((&dga, &dua), (&dgb, &dub), "swiglu_grad_values");
        let same = |name: &str, f: &dyn Fn(&mut [f32]), g: &dyn Fn(&mut [f32])| {
            let (mut a, mut b) = (vec![0f32; rows * v], vec![0f32; rows * v]);
            f(&mut a);
            g(&mut b);
            assert_eq!(a, b, "{name}");
            assert!(a.iter().any(|&x| x != 0.0), "{name} wrote nothing");
        };
        let (w, bias) = (&x[..v], &u[..v]);
        same(
            "softmax_grad_rows",
            &|o| softmax_grad_rows::baseline(u, dy, v, 0.3, o),
            &|o| unsafe { softmax_grad_rows::avx2(u, dy, v, 0.3, o) },
        );
        for centred in [false, true] {
            same(
                "norm_rows",
                &|o| norm_rows::baseline(&x, v, w, bias, 1e-5, centred, o),
                &|o| unsafe { norm_rows::avx2(&x, v, w, bias, 1e-5, centred, o) },
            );
            same(
                "norm_grad_rows",
                &|o| norm_grad_rows::baseline(&x, dy, v, w, 1e-5, centred, o),
                &|o| unsafe { norm_grad_rows::avx2(&x, dy, v, w, 1e-5, centred, o) },
            );
        }
        // RoPE over [B 2, H 3, S 1, D 12]: the tables are [2, 1, 1, 12].
        let (d, tables) = (12, (&u[..24], &dy[..24]));
        let xr = &x[..72];
        for inverse in [false, true] {
            let (mut a, mut b) = (vec![0f32; 72], vec![0f32; 72]);
            rope_rows::baseline(xr, d, (3, 1), 0, tables, inverse, &mut a);
            unsafe { rope_rows::avx2(xr, d, (3, 1), 0, tables, inverse, &mut b) };
            assert_eq!(a, b, "rope_rows");
        }
    }

    #[test]
    fn lane_reductions_cover_every_element_including_the_tail() {
        // Lengths below, at and above the lane count, with and without a tail.
        for n in [0usize, 1, 5, 8, 13, 16, 160, 4099] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 29) as f32 - 14.0) / 3.0)
                .collect();
            let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
            let dot64: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let tol = 1e-5 * (1.0 + n as f64);
            assert!(
                (f64::from(sum_map(&x, |v| v)) - sum).abs() <= tol,
                "sum of {n}"
            );
            assert!(
                (f64::from(dot(&x, &y)) - dot64).abs() <= tol * 10.0,
                "dot of {n}"
            );
            assert_eq!(row_max(&x), max, "max of {n}");
        }
        // The maximum is found in every lane position and in the tail.
        for at in 0..13 {
            let mut x = vec![0f32; 13];
            x[at] = 1.0;
            assert_eq!(row_max(&x), 1.0, "max at {at}");
        }
    }

    #[test]
    fn portable_exp_is_within_two_ulps_of_libm_and_zero_below_the_normal_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.013_7;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
