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
//!
//! The files, one job each: `rows.rs` (reading tensors' values, row tasks in parallel,
//! the lane reductions, `exp`, and the direct gemm products `matmul` and `matmul_sum`),
//! `attention.rs` (softmax, the attention core and Llama's attention block, head split
//! and merge), `layer.rs` (frozen linear, cross-entropy, norms, RoPE, SwiGLU and
//! Llama's MLP block), `tests.rs` (unit tests of the row kernels and the gemm products).

/// `fn name(args) body`, compiled twice: for baseline x86-64 (the crate's target, SSE2)
/// and with AVX2 enabled, the AVX2 build picked at run time when the CPU has it (8-wide
/// vectors in the row loops instead of 4-wide). The body must return `()`, and its
/// float loops may call only `#[inline(always)]` helpers (`exp`, `row_max`, `sum_map`,
/// `dot`): a call that is not inlined runs in the baseline build. The two builds give
/// the same bits: Rust never contracts or reorders float operations, only the vector
/// width changes.
///
/// A visibility before `fn` applies to the function and to the module `name` of its
/// two builds (`name::baseline`, `name::avx2`), which the unit tests in `tests.rs`
/// compare: `pub(super) fn name` makes both reachable from the whole `kernels` folder.
macro_rules! with_avx2 {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { $name::avx2($($arg),*) };
            }
            $name::baseline($($arg),*)
        }

        /// The two builds of the function of the same name (tests compare them).
        $vis mod $name {
            #[allow(unused_imports)] // a body may need nothing from the module
            use super::*;

            #[inline(always)]
            pub fn baseline($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            pub unsafe fn avx2($($arg: $ty),*) {
                baseline($($arg),*)
            }
        }
    };
}

// The macro above is in scope in the modules declared below (and only there).
mod attention;
mod layer;
mod rows;
#[cfg(test)]
mod tests;

pub use attention::{AttentionBlock, AttentionCore, Heads, Softmax};
pub use layer::{CrossEntropy, FrozenLinear, Norm, Rope, SwiGlu, SwiGluMlp};
pub(crate) use rows::{matmul, matmul_sum};
