//! The shared plumbing of the kernels: the f32 values of contiguous CPU tensors, row
//! tasks run in parallel, the lane reductions (`sum_map`, `row_max`, `dot`) and the
//! portable `exp` that the `with_avx2!` row loops call, and gemm products outside the
//! graph (`matmul`, `matmul_sum`) without a zero-filled output.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread.
pub(super) const PARALLEL_MIN: usize = 1 << 15;

/// The f32 values of a contiguous CPU tensor argument, and its last dimension.
pub(super) fn rows<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
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
pub(super) fn with_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: expected a CPU tensor")
    };
    let (values, _) = rows(cpu, layout, op)?;
    Ok(f(values))
}

/// The f32 values of a frozen weight `[n]`.
pub(super) fn weight_values(w: &Tensor, op: &str) -> candle_core::Result<Vec<f32>> {
    w.flatten_all()
        .and_then(|w| w.to_vec1::<f32>())
        .map_err(|e| candle_core::Error::Msg(format!("{op}: weight: {e}")))
}

/// `len` zeros, written by the pool's threads when there are many: a kernel's output
/// buffer. `vec![0.0; len]` fills it on the calling thread, serial work that showed up
/// as a tenth of the main thread's time in a training step.
pub(super) fn zeros(len: usize) -> Vec<f32> {
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
pub(super) fn map_row_tasks(
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
pub(super) fn map_row_tasks2(
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
pub(super) struct Operand<'a> {
    pub(super) v: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
    pub(super) skip: usize,
}

impl Operand<'_> {
    /// Whether `batches` matrices of `rows x cols` lie within the values.
    pub(super) fn fits(&self, batches: usize, rows: usize, cols: usize) -> bool {
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
pub(super) fn gemm_batched(
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

pub(super) fn output(values: Vec<f32>, l: &Layout) -> (CpuStorage, Shape) {
    (CpuStorage::F32(values), l.shape().clone())
}

/// The forward pass of a residual block op ([`AttentionBlock`], [`SwiGluMlp`]):
/// `x + branch`, the branch (`[..., E]`, like `x`) computed outside the graph from the
/// same `x`. The sum is written straight into the op's output, in parallel: no separate
/// add and copy.
///
/// [`AttentionBlock`]: super::AttentionBlock
/// [`SwiGluMlp`]: super::SwiGluMlp
pub(super) fn residual(
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
///
/// [`AttentionCore`]: super::AttentionCore
pub(super) fn handed_over(
    op: &str,
    input: &[usize],
    y: &Tensor,
) -> candle_core::Result<(CpuStorage, Shape)> {
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
pub(super) fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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
pub(super) fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
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
pub(super) fn row_max(x: &[f32]) -> f32 {
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
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_map2(a, b, |a, b| a * b)
}

/// `e^x` in f32 from IEEE basic operations only: the same bits on every platform (libm's
/// `expf` differs between glibc, MSVC and Apple), and a branch-free body the compiler
/// vectorises in the kernels' loops (libm's scalar `expf` was 7% of a training step).
/// Range reduction `x = k ln2 + r`, |r| <= ln2 / 2, then Cephes' degree-5 polynomial
/// for `e^r` (relative error about 1e-7) and `2^k` built from its exponent bits.
/// Below -87.3 (where `e^x` leaves the normal f32 range) the result is 0.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
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
