//! The feed-forward sub-layers.
//!
//! - [`GeluMlp`]: GPT-2's, GPT-BigCode's, Bloom's and GPT-NeoX's two-layer
//!   `down(gelu(up(x)))`.
//! - [`GatedMlp`]: the RoPE decoders' (Llama and the Llama-like families, Gemma 2/3)
//!   `down(act(gate(n)) * up(n))`, stored as `mlp.gate_proj`, `mlp.up_proj` and
//!   `mlp.down_proj`, or Phi-3's fused `mlp.gate_up_proj`. The Llama decoder runs it as
//!   SwiGLU with its residual ([`GatedMlp::swiglu_residual`], a block op when
//!   training); Gemma as GELU ([`GatedMlp::gelu`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::nn::{block_ops, own_kernel, rms_norm, swiglu, Linear, Ops};
use super::weights::{fused_linears, linear};
use super::{kernels, Gelu};
use crate::engine::diagnosis::Result;

/// The two-layer GELU MLP of GPT-2, GPT-BigCode, Bloom and GPT-NeoX: `down(gelu(up(x)))`.
pub struct GeluMlp {
    /// `Linear` `[E, inner]`
    pub up: Linear,
    /// `Linear` `[inner, E]`
    pub down: Linear,
    /// The tanh approximation (GPT-2, BigCode, Bloom), or GPT-NeoX's `hidden_act`.
    pub gelu: Gelu,
}

impl GeluMlp {
    /// `x: [B, S, E]` -> `[B, S, E]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.down.forward(&self.gelu.apply(&self.up.forward(x)?)?)
    }
}

/// A layer's gated MLP.
pub struct GatedMlp {
    /// `Linear` `[E, I]`
    pub gate_proj: Linear,
    /// `Linear` `[E, I]`
    pub up_proj: Linear,
    /// `Linear` `[I, E]`
    pub down_proj: Linear,
}

impl GatedMlp {
    /// Layer `p`'s MLP (`{p}.mlp.*`) of hidden size `e` and inner size `inter`, with a
    /// bias `[I]` / `[E]` on each projection when `bias`. `fused`: Phi-3's one
    /// `gate_up_proj` `[2*I, E]` (gate, then up along the output dimension; no bias).
    pub fn load(
        vb: &VarBuilder,
        p: &str,
        (e, inter): (usize, usize),
        bias: bool,
        fused: bool,
    ) -> Result<Self> {
        let name = |n: &str| format!("{p}.mlp.{n}");
        let [gate_proj, up_proj] = if fused {
            fused_linears(vb, &name("gate_up_proj"), e, [inter, inter])?
        } else {
            [
                linear(vb, &name("gate_proj"), e, inter, bias)?,
                linear(vb, &name("up_proj"), e, inter, bias)?,
            ]
        };
        let down_proj = linear(vb, &name("down_proj"), inter, e, bias)?;
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj,
        })
    }

    /// Gemma's MLP branch, without norms or residual: `down(gelu(gate(n)) * up(n))`.
    /// `n: [B, S, E]` -> `[B, S, E]`.
    pub fn gelu(&self, n: &Tensor, gelu: Gelu) -> candle_core::Result<Tensor> {
        // [B, S, I]
        let g = gelu.apply(&self.gate_proj.forward(n)?)?;
        self.down_proj.forward(&(g * self.up_proj.forward(n)?)?)
    }

    /// Llama's MLP sub-block with its residual: `x + down(swiglu(gate(n), up(n)))`,
    /// `n = rms_norm(x, norm_w)` with `eps`. `x: [..., E]`, `norm_w: [E]` -> `[..., E]`.
    ///
    /// When `x` is in a training graph (CPU, f32) and `ops` is [`Ops::Kernels`], the
    /// block is one graph node with its own backward pass ([`kernels::SwiGluMlp`]);
    /// otherwise (generation, other devices, the other modes) it is composed from
    /// single ops. Both compute the forward pass with the same kernels, so the values
    /// are the same.
    pub fn swiglu_residual(
        &self,
        x: &Tensor,
        (norm_w, eps): (&Tensor, f64),
        ops: Ops,
    ) -> candle_core::Result<Tensor> {
        let (gate, up, down) = (&self.gate_proj, &self.up_proj, &self.down_proj);
        // (down(swiglu(gate(n), up(n))), gate(n), up(n)): [..., E], [..., I], [..., I]
        let branch = |x: &Tensor| -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let n = rms_norm(x, norm_w, eps, ops)?;
            let (g, u) = (gate.forward(&n)?, up.forward(&n)?);
            Ok((down.forward(&swiglu(&g, &u)?)?, g, u))
        };
        if !x.track_op() || !block_ops(x, &[norm_w], ops) {
            return x + branch(x)?.0;
        }
        let (branch_out, gate_out, up_out) = branch(&x.detach())?;
        if !(own_kernel(&gate_out, &[]) && gate_out.is_contiguous() && up_out.is_contiguous()) {
            return x + branch(x)?.0;
        }
        x.contiguous()?.apply_op1(kernels::SwiGluMlp {
            branch: branch_out,
            gate_out,
            up_out,
            norm: kernels::Norm {
                w: norm_w.clone(),
                b: None,
                eps: eps as f32,
                centred: false,
            },
            gate: gate.clone(),
            up: up.clone(),
            down: down.clone(),
        })
    }
}
