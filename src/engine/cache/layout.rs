//! The memory layouts a cache stores: standard 4-D, and the legacy 3-D layouts of
//! older transformers (Bloom, GPT-BigCode), with the conversions from and to the
//! standard `[B, KVH, S, D]` that attention works in.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::engine::diagnosis::{DiagnosisClass, TensorKind};

/// The memory layout of one layer's stored keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// keys and values `[batch, kv_heads, seq, head_dim]`.
    Standard,
    /// Bloom before transformers 4.44: keys `[batch*heads, head_dim, seq]`,
    /// values `[batch*heads, seq, head_dim]`.
    BloomLegacy,
    /// GPT-BigCode multi-query before transformers 4.54: one tensor `[batch, seq, 2*head_dim]`
    /// holding K then V along the last dimension (stored here as both key and value).
    BigcodeFused,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Standard => "standard",
            Layout::BloomLegacy => "bloom-legacy",
            Layout::BigcodeFused => "bigcode-fused",
        }
    }

    /// The dimension along which positions grow, for keys and for values.
    pub fn seq_dim(&self, tensor: TensorKind) -> usize {
        match (self, tensor) {
            (Layout::Standard, _) => 2,
            (Layout::BloomLegacy, TensorKind::Key) => 2,
            (Layout::BloomLegacy, _) => 1,
            (Layout::BigcodeFused, _) => 1,
        }
    }

    /// What each dimension means, to name the class of a mismatch.
    pub(super) fn roles(&self, tensor: TensorKind) -> &'static [DiagnosisClass] {
        use DiagnosisClass::*;
        match (self, tensor) {
            (Layout::Standard, _) => &[Batch, KvHeads, SeqLen, HeadDim],
            (Layout::BloomLegacy, TensorKind::Key) => &[Batch, HeadDim, SeqLen],
            (Layout::BloomLegacy, _) => &[Batch, SeqLen, HeadDim],
            (Layout::BigcodeFused, _) => &[Batch, SeqLen, HeadDim],
        }
    }

    pub(super) fn dims_text(&self, tensor: TensorKind) -> &'static str {
        match (self, tensor) {
            (Layout::Standard, _) => "[batch, kv_heads, seq, head_dim]",
            (Layout::BloomLegacy, TensorKind::Key) => "[batch*heads, head_dim, seq]",
            (Layout::BloomLegacy, _) => "[batch*heads, seq, head_dim]",
            (Layout::BigcodeFused, _) => "[batch, seq, 2*head_dim]",
        }
    }

    /// Standard `[B, H, S, D]` keys and values to this layout.
    pub fn from_standard(&self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Layout::Standard => Ok((k.clone(), v.clone())),
            Layout::BloomLegacy => {
                let (b, h, s, d) = k.dims4()?;
                // keys [B*H, D, S], values [B*H, S, D]
                let k3 = k.reshape((b * h, s, d))?.transpose(1, 2)?.contiguous()?;
                let v3 = v.reshape((b * h, s, d))?;
                Ok((k3, v3))
            }
            Layout::BigcodeFused => {
                let (_b, h, _s, _d) = k.dims4()?;
                if h != 1 {
                    candle_core::bail!("bigcode-fused layout holds one kv head, got {h}");
                }
                // [B, S, 2D]: K then V along the last dimension
                let kv = Tensor::cat(&[&k.squeeze(1)?, &v.squeeze(1)?], 2)?;
                Ok((kv.clone(), kv))
            }
        }
    }

    /// This layout back to standard `[B, H, S, D]`, given the number of KV heads.
    pub fn to_standard(
        &self,
        k: &Tensor,
        v: &Tensor,
        kv_heads: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Layout::Standard => Ok((k.clone(), v.clone())),
            Layout::BloomLegacy => {
                let (bh, d, s) = k.dims3()?;
                let b = bh / kv_heads;
                let k4 = k.transpose(1, 2)?.reshape((b, kv_heads, s, d))?;
                let v4 = v.reshape((b, kv_heads, s, d))?;
                Ok((k4, v4))
            }
            Layout::BigcodeFused => {
                let (_b, _s, d2) = k.dims3()?;
                let d = d2 / 2;
                let k4 = k.narrow(2, 0, d)?.unsqueeze(1)?;
                let v4 = v.narrow(2, d, d)?.unsqueeze(1)?;
                Ok((k4, v4))
            }
        }
    }

    pub(super) fn cat(
        &self,
        a: &Tensor,
        b: &Tensor,
        tensor: TensorKind,
    ) -> candle_core::Result<Tensor> {
        Tensor::cat(&[a, b], self.seq_dim(tensor))
    }
}
