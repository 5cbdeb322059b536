//! Building blocks shared by the model families.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` have no
//! backward pass (DESIGN.md): gradients silently stop at them. By default everything
//! here is composed from differentiable tensor ops so that the prefix trains through
//! it; [`with_fused_ops`] switches the softmax and norms to the fused kernels.

use std::cell::Cell;

use candle_core::{DType, Tensor, D};

thread_local! {
    /// Use candle-nn's fused kernels (no backward pass) on this thread.
    static FUSED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with candle-nn's fused softmax / norms on this thread: faster, but they have
/// no backward pass, so gradients silently stop at them (DESIGN.md). For generation,
/// and to reproduce the historical "training through fused ops" bug (`no-grad`).
pub fn with_fused_ops<T>(f: impl FnOnce() -> T) -> T {
    let before = FUSED.with(|c| c.replace(true));
    let out = f();
    FUSED.with(|c| c.set(before));
    out
}

fn fused() -> bool {
    FUSED.with(Cell::get)
}

/// `x @ w.T + b` for a PyTorch `nn.Linear` weight `w: [out, in]`.
/// `x: [..., in]` -> `[..., out]`
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x @ w + b` for a GPT-2 `Conv1D` weight `w: [in, out]`.
/// `x: [..., in]` -> `[..., out]`
pub fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_matmul(w)?.broadcast_add(b)
}

/// LayerNorm over the last dimension (differentiable). `x: [..., H]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused() {
        return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32);
    }
    candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)
}

/// RMSNorm over the last dimension (differentiable). `x: [..., H]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused() {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    candle_nn::ops::rms_norm_slow(x, w, eps as f32)
}

/// GELU, tanh approximation (GPT-2 `gelu_new`, Bloom, `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu()
}

/// Softmax over the last dimension (differentiable, unlike `softmax_last_dim`).
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Rows of `table: [V, H]` for `ids: [B, S]` -> `[B, S, H]`.
pub fn embed(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let h = table.dim(1)?;
    table
        .index_select(&ids.flatten_all()?.to_dtype(DType::U32)?, 0)?
        .reshape((b, s, h))
}
