//! Attention shared by every family: the mask (prefix columns, causality, window,
//! padding) and scaled dot-product attention with grouped KV heads. Shape checks here
//! turn into diagnoses naming the layer.

use candle_core::Tensor;

use super::kernels::matmul;
use super::nn::Ops;
use crate::engine::cache::{ChunkMask, KvView};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, Result, Site, TensorKind,
};

/// Which keys a query may see.
#[derive(Debug, Clone, Copy)]
pub struct MaskSpec {
    /// Absolute position of the first query.
    pub q_start: usize,
    /// Number of queries S.
    pub q_len: usize,
    /// Absolute position of the first key.
    pub kv_start: usize,
    /// Number of keys K.
    pub kv_len: usize,
    /// Causal masking among positions (prefix positions are always in the past).
    pub causal: bool,
    /// Sliding window: query at p sees keys in (p - W, p].
    pub window: Option<usize>,
}

/// Additive attention mask `[B, 1, S, K]` from a padding mask `pad: [B, T]`
/// (1 = visible, 0 = padding; prefix columns included), where `T` must equal
/// `kv_start + kv_len`, the positions written so far.
pub fn additive_mask(
    pad: &Tensor,
    spec: MaskSpec,
    layer: usize,
    attention: Attention,
) -> Result<Tensor> {
    let site = Site::new(layer, attention, TensorKind::Mask);
    let (b, t) = pad.dims2().at(site, "padding mask")?;
    let total = spec.kv_start + spec.kv_len;
    if t != total {
        return Err(Diagnosis::new(
            DiagnosisClass::MaskWidth,
            format!(
                "the attention mask covers {t} positions but the keys span {total} (prefix and cached positions included)"
            ),
        )
        .at(layer, attention, TensorKind::Mask)
        .shapes(&[b, total], &[b, t])
        .hint(if t < total {
            "the attention mask was not extended by the P prefix columns (prefix tuning must prepend P ones to the mask)"
        } else {
            "the attention mask is wider than the cache: positions were masked that the cache does not hold"
        })
        .into());
    }
    let device = pad.device().clone();
    let pad: Vec<Vec<f32>> = pad
        .to_dtype(candle_core::DType::F32)
        .and_then(|p| p.to_vec2())
        .at(site, "padding mask")?;
    let (s, k) = (spec.q_len, spec.kv_len);
    let mut data = vec![0f32; b * s * k];
    for (bi, row) in pad.iter().enumerate() {
        for qi in 0..s {
            let qp = spec.q_start + qi;
            for ki in 0..k {
                let kp = spec.kv_start + ki;
                let visible = row[kp] > 0.5
                    && (!spec.causal || kp <= qp)
                    && spec.window.is_none_or(|w| kp + w > qp);
                if !visible {
                    data[(bi * s + qi) * k + ki] = f32::NEG_INFINITY;
                }
            }
        }
    }
    // A fully masked row (a padding query) would give NaN: let it see everything;
    // its output is never used.
    for r in 0..b * s {
        let row = &mut data[r * k..(r + 1) * k];
        if row.iter().all(|x| x.is_infinite()) {
            row.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    Tensor::from_vec(data, (b, 1, s, k), &device).at(site, "build mask")
}

/// Repeat KV heads to the query heads: `[B, KVH, K, D]` -> `[B, KVH * n_rep, K, D]`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, k, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, k, d))?
        .reshape((b, kvh * n_rep, k, d))
}

/// What attention needs besides `q, k, v`: how the scores are formed,
/// `softmax(scale * q k^T + bias + mask)`, with which kernels, and where the attention
/// sits (for diagnoses).
#[derive(Debug, Clone, Copy)]
pub struct Scores<'a> {
    /// `[B or 1, 1, S, K]`, additive.
    pub mask: &'a Tensor,
    /// `[1 or B, H, S, K]`, additive (ALiBi, T5's relative positions), or none.
    pub bias: Option<&'a Tensor>,
    pub scale: f64,
    pub layer: usize,
    pub attention: Attention,
    /// The pass's ops mode: which softmax runs, and whether the product may be one
    /// graph node ([`super::kernels::AttentionCore`]).
    pub ops: Ops,
}

impl<'a> Scores<'a> {
    /// Scores of `layer`'s `attention` under `mask`, scaled by `scale`, no bias, with
    /// the kernels of `ops`.
    pub fn new(mask: &'a Tensor, scale: f64, layer: usize, attention: Attention, ops: Ops) -> Self {
        Self {
            mask,
            bias: None,
            scale,
            layer,
            attention,
            ops,
        }
    }

    /// Where a failure of this attention's `kind` tensor is reported.
    pub fn site(&self, kind: TensorKind) -> Site {
        Site::new(self.layer, self.attention, kind)
    }

    /// The same with an additive bias.
    pub fn with_bias(self, bias: Option<&'a Tensor>) -> Self {
        Self { bias, ..self }
    }
}

/// Scaled dot-product attention.
///
/// `q: [B, H, S, D]`, `k, v: [B, KVH, K, D]`, `mask: [B, 1, S, K]` (additive),
/// `bias: [1 or B, H, S, K]` (ALiBi, T5 relative positions) -> `[B, H, S, D]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, sc: &Scores) -> Result<Tensor> {
    let Scores {
        scale,
        layer,
        attention,
        ops,
        ..
    } = *sc;
    // Training: the whole product as one graph node with its own backward pass, when
    // the crate's softmax kernel takes the scores (not in `Ops::Fused`, whose candle-nn
    // softmax must keep cutting the gradient). The forward pass runs outside the graph
    // on detached tensors, through the same code as below; asking first keeps the
    // other cases from computing it twice.
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if tracked && k.dims() == v.dims() && super::nn::own_softmax(q, ops) {
        let (out, probs) = sdpa_detached(q, k, v, sc)?;
        if let Some(probs) = probs {
            let op = super::kernels::AttentionCore {
                out,
                probs,
                scale: scale as f32,
            };
            return q
                .apply_op3(k, v, op)
                .at(Site::new(layer, attention, TensorKind::Value), "attention");
        }
    }
    check_keys(q, k, sc)?;
    attend(q, k, v, sc).map(|(out, _)| out)
}

/// Scaled dot-product attention with logit soft-capping (Gemma 2's
/// `attn_logit_softcapping`), as transformers' `eager_attention_forward` computes it:
/// `softmax(cap * tanh(scale * q k^T / cap) + mask) v`, the cap on the scaled scores,
/// before the mask and the softmax. `cap: None` is plain [`sdpa`]. Composed from
/// differentiable candle ops (the prefix trains through it); shapes are checked as in
/// [`sdpa`].
///
/// `q: [B, H, S, D]`, `k, v: [B, KVH, K, D]`, `mask: [B or 1, 1, S, K]` (additive)
/// -> `[B, H, S, D]`.
pub fn softcapped_sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sc: &Scores,
    cap: Option<f64>,
) -> Result<Tensor> {
    let Some(cap) = cap else {
        return sdpa(q, k, v, sc);
    };
    check_keys(q, k, sc)?;
    let Scores {
        mask, scale, ops, ..
    } = *sc;
    let (site_k, site_v) = (sc.site(TensorKind::Key), sc.site(TensorKind::Value));
    let (h, kvh) = (
        q.dim(1).at(site_k, "queries")?,
        k.dim(1).at(site_k, "keys")?,
    );
    // [B, H, K, D]: HF repeat_kv order (query head i reads KV head i / G).
    let k = repeat_kv(k, h / kvh)
        .and_then(|k| k.contiguous())
        .at(site_k, "repeat kv heads")?;
    let v = repeat_kv(v, h / kvh)
        .and_then(|v| v.contiguous())
        .at(site_v, "repeat kv heads")?;
    // [B, H, S, K]: scale, then cap * tanh(x / cap)
    let scores = q
        .contiguous()
        .and_then(|q| q.matmul(&k.t()?))
        .and_then(|s| s * scale)
        .and_then(|s| (s / cap)?.tanh()? * cap)
        .at(site_k, "soft-capped attention scores")?;
    let probs = scores
        .broadcast_add(mask)
        .at(sc.site(TensorKind::Mask), "apply mask")
        .and_then(|s| super::nn::softmax(&s, ops).at(site_k, "softmax"))?;
    // [B, H, S, D]
    probs.matmul(&v).at(site_v, "attention output")
}

/// [`sdpa`] outside the graph (on detached inputs), for the ops that bring their own
/// backward pass: `(output [B, H, S, D], probabilities [B, H, S, K])`, the
/// probabilities only when the crate's softmax kernel computed them and `k`, `v` have
/// the same shape (what those backward passes assume).
pub fn sdpa_detached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sc: &Scores,
) -> Result<(Tensor, Option<Tensor>)> {
    check_keys(q, k, sc)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, probs) = attend(&qd, &kd, &vd, sc)?;
    Ok((out, probs.filter(|_| k.dims() == v.dims())))
}

/// The keys' shape against the queries' `[B, H, S, D]`, and the mask's against both
/// (`[B or 1, 1, S, K]`): a diagnosis naming the layer when the rank, batch, head_dim,
/// KV head grouping or mask width disagree.
fn check_keys(q: &Tensor, k: &Tensor, sc: &Scores) -> Result<()> {
    let Scores {
        mask,
        layer,
        attention,
        ..
    } = *sc;
    let (qb, h, _s, qd) = q
        .dims4()
        .at(Site::new(layer, attention, TensorKind::Query), "queries")?;
    let kdims = k.dims().to_vec();
    if kdims.len() != 4 {
        return Err(Diagnosis::new(
            DiagnosisClass::Rank,
            format!("attention needs 4-D keys [batch, kv_heads, seq, head_dim], got {kdims:?}"),
        )
        .at(layer, attention, TensorKind::Key)
        .shapes(&[qb, 0, 0, qd], &kdims)
        .into());
    }
    let (kb, kvh, kl, kd) = (kdims[0], kdims[1], kdims[2], kdims[3]);
    // The first disagreement, in this order: (disagrees, class, expected key shape,
    // message, hint).
    let checks = [
        (
            kb != qb,
            DiagnosisClass::Batch,
            [qb, kvh, kl, kd],
            format!("queries have batch {qb} but keys have batch {kb}"),
            "the cache (or prefix) was built for a different batch size, e.g. not expanded to batch x beams",
        ),
        (
            kd != qd,
            DiagnosisClass::HeadDim,
            [kb, kvh, kl, qd],
            format!("queries have head_dim {qd} but keys have head_dim {kd}"),
            "the prefix head_dim differs from the model's (config head_dim / d_kv ignored?)",
        ),
        (
            kvh == 0 || h % kvh != 0,
            DiagnosisClass::KvHeads,
            [kb, h, kl, kd],
            format!("{h} query heads cannot be grouped over {kvh} key/value heads"),
            "the prefix was built with a head count that is not the model's num_key_value_heads",
        ),
    ];
    if let Some((_, class, expected, msg, hint)) = checks.into_iter().find(|c| c.0) {
        return Err(Diagnosis::new(class, msg)
            .at(layer, attention, TensorKind::Key)
            .shapes(&expected, &kdims)
            .hint(hint)
            .into());
    }
    let s = q.dims()[2];
    let m = mask.dims().to_vec();
    let fits = m.len() == 4 && (m[0] == qb || m[0] == 1) && m[1] == 1 && m[2] == s && m[3] == kl;
    if !fits {
        return Err(Diagnosis::new(
            DiagnosisClass::MaskWidth,
            format!(
                "the attention mask is {m:?} but {s} queries attend over {kl} keys (expected [{qb}, 1, {s}, {kl}])"
            ),
        )
        .at(layer, attention, TensorKind::Mask)
        .shapes(&[qb, 1, s, kl], &m)
        .hint(if m.len() == 4 && m[3] < kl {
            "the mask was built for fewer keys than the cache returns: a prompt chunk's mask must span the prefix, the earlier chunks and the chunk ([S, past + S]), not only the chunk (candle issue 2153)"
        } else {
            "the mask and the keys disagree on the number of positions"
        })
        .into());
    }
    Ok(())
}

/// The body of [`sdpa`] once the shapes are checked: `(output [B, H, S, D], attention
/// probabilities [B, H, S, K] when the crate's softmax kernel computed them)`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, sc: &Scores) -> Result<(Tensor, Option<Tensor>)> {
    let Scores {
        mask,
        bias,
        scale,
        ops,
        ..
    } = *sc;
    let site_k = sc.site(TensorKind::Key);
    let (qb, h, s, qd) = q.dims4().at(site_k, "queries")?;
    let (kvh, kl) = (k.dim(1).at(site_k, "keys")?, k.dim(2).at(site_k, "keys")?);
    let site_v = sc.site(TensorKind::Value);
    // Grouped-query attention without copying keys and values per query head: the G
    // query heads that share a KV head (HF repeat_kv order: head i reads KV head i / G)
    // are consecutive, so `[B, H, S, D]` is `[B, KVH, G*S, D]` with the same data.
    // When k and v disagree the shapes go the long way, so that the error (a
    // diagnosis) names the same shapes as plain attention.
    let group = h / kvh;
    let grouped = group > 1 && k.dims() == v.dims();
    // Contiguous keys: their transpose is a layout gemm takes as it is (copying the
    // transposed keys instead cost 18% of a decode step, ci/bench/README.md).
    let (k, v) = if grouped {
        (k.contiguous().at(site_k, "keys")?, v.clone())
    } else {
        let k = repeat_kv(k, group).at(site_k, "repeat kv heads")?;
        let k = k.contiguous().at(site_k, "keys")?;
        (k, repeat_kv(v, group).at(site_v, "repeat kv heads")?)
    };
    // [B, H, S, K]
    let mut scores = q
        .contiguous()
        .and_then(|q| match grouped {
            true => matmul(&q.reshape((qb, kvh, group * s, qd))?, &k.t()?)?.reshape((qb, h, s, kl)),
            false => matmul(&q, &k.t()?),
        })
        .at(site_k, "attention scores")?;
    let adds: Vec<&Tensor> = bias.into_iter().chain([mask]).collect();
    let fused =
        super::nn::scaled_masked_softmax(&scores, scale, &adds, ops).at(site_k, "softmax")?;
    let own_softmax = fused.is_some();
    let probs = match fused {
        Some(probs) => probs,
        None => {
            if scale != 1.0 {
                scores = (scores * scale).at(site_k, "scale scores")?;
            }
            if let Some(bias) = bias {
                scores = scores.broadcast_add(bias).at(site_k, "attention bias")?;
            }
            let scores = scores
                .broadcast_add(mask)
                .at(sc.site(TensorKind::Mask), "apply mask")?;
            super::nn::softmax(&scores, ops).at(site_k, "softmax")?
        }
    };
    let v = v.contiguous().at(site_k, "values")?;
    // [B, H, S, D]
    let out = match grouped {
        true => probs
            .reshape((qb, kvh, group * s, kl))
            .and_then(|p| matmul(&p, &v))
            .and_then(|o| o.reshape((qb, h, s, qd))),
        false => matmul(&probs, &v),
    }
    .at(site_v, "attention output")?;
    Ok((out, own_softmax.then_some(probs)))
}

/// `[B, S, H*D]` -> `[B, H, S, D]` (contiguous when f32 on the CPU: one graph node).
pub fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> candle_core::Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    if super::nn::own_kernel(x, &[]) && heads > 0 && hd == heads * head_dim {
        let op = super::kernels::Heads { heads, split: true };
        return x.contiguous()?.apply_op1(op);
    }
    x.reshape((b, s, heads, head_dim))?.transpose(1, 2)
}

/// `[B, H, S, D]` -> `[B, S, H*D]` (one graph node when f32 on the CPU).
pub fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    if super::nn::own_kernel(x, &[]) {
        let op = super::kernels::Heads {
            heads: h,
            split: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Where a decoder layer's self-attention meets the cache: `layer`, the position
/// `past` of the first new token (read before layer 0 updated the cache) and the
/// window of keys a query sees, if any.
#[derive(Debug, Clone, Copy)]
pub struct CachedStep {
    pub layer: usize,
    pub past: usize,
    pub window: Option<usize>,
}

impl CachedStep {
    /// Layer `layer`'s step in the pass `fw` whose first new token sits at `past`: its
    /// queries see the keys within the cache's window (`fw.cache.window()`), which
    /// applies to every layer, else within the layer's own `layer_window` from the
    /// config (`None`: every key).
    pub fn new(
        fw: &super::Forward,
        layer: usize,
        past: usize,
        layer_window: Option<usize>,
    ) -> Self {
        Self {
            layer,
            past,
            window: fw.cache.window().or(layer_window),
        }
    }
}

/// Decoder self-attention through the cache, the same in every family: append the new
/// keys and values and build the mask ([`cached_keys`]), and attend.
///
/// `q: [B, H, S, D]`, `k, v: [B, KVH, S, D]` for the S new tokens at positions
/// `step.past..step.past+S`; `bias(kv_start, kv_len)` returns an additive
/// `[1 or B, H, S, K]` bias (ALiBi, T5 relative positions) or `None`. Returns
/// `[B, H, S, D]`.
pub fn cached_self_attention(
    fw: &mut super::Forward,
    step: CachedStep,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &mut dyn FnMut(usize, usize) -> Result<Option<Tensor>>,
) -> Result<Tensor> {
    let (view, mask) = cached_keys(fw, step, k, v)?;
    let kv_len = view.k.dims()[2];
    let bias = bias(view.kv_start, kv_len)?;
    let scores =
        Scores::new(&mask, scale, step.layer, Attention::SelfAttn, fw.ops).with_bias(bias.as_ref());
    sdpa(q, &view.k, &view.v, &scores)
}

/// The cache's side of decoder self-attention: append the new keys and values
/// `k, v: [B, KVH, S, D]` (positions `step.past..step.past+S`), and build the mask
/// `[B, 1, S, K]` over every key the cache returns (prefix, cached and new positions;
/// causal, windowed, padding), recorded in the trace. Returns the cache's view (keys
/// and values `[B, KVH, K, D]`, the S new ones last) and the mask.
pub fn cached_keys(
    fw: &mut super::Forward,
    step: CachedStep,
    k: &Tensor,
    v: &Tensor,
) -> Result<(KvView, Tensor)> {
    let CachedStep {
        layer,
        past,
        window,
    } = step;
    let att = Attention::SelfAttn;
    let s = k
        .dim(2)
        .at(Site::new(layer, att, TensorKind::Key), "new keys")?;
    // view.k, view.v: [B, KVH, K, D]
    let view = fw.cache.update_self(layer, k, v, (past, past + s))?;
    let kv_len = view
        .k
        .dim(2)
        .at(Site::new(layer, att, TensorKind::Key), "key length")?;
    let mut spec = MaskSpec {
        q_start: past,
        q_len: s,
        kv_start: view.kv_start,
        kv_len,
        causal: true,
        window,
    };
    // A prompt chunk after cached prompt positions (several queries, fewer than the
    // keys past the prefix): where the historical chunk-mask bugs show.
    let prefix_len = fw.cache.prefix_len();
    let later_chunk = s > 1 && past > prefix_len;
    let chunk_mask = fw.cache.config.chunk_mask;
    if later_chunk && chunk_mask == ChunkMask::UpperLeft {
        // The triangle starts right after the prefix: query i of the chunk is taken
        // for position P + i and sees none of the earlier chunks' later positions.
        spec.q_start = prefix_len;
    }
    // [B, 1, S, K]
    let mut mask = additive_mask(fw.mask, spec, layer, att)?;
    if later_chunk && chunk_mask == ChunkMask::Square {
        // [B, 1, S, P + S]: the prefix columns and the chunk's own, nothing between.
        let site = Site::new(layer, att, TensorKind::Mask);
        let p = prefix_len.saturating_sub(view.kv_start).min(kv_len);
        mask = Tensor::cat(
            &[
                &mask.narrow(3, 0, p).at(site, "mask")?,
                &mask.narrow(3, kv_len - s, s).at(site, "mask")?,
            ],
            3,
        )
        .at(site, "square chunk mask")?;
    }
    fw.cache.note_mask(layer, att, mask.dims());
    Ok((view, mask))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// Values shorter than the keys fail the output product: the diagnosis names the
    /// values of the scores' layer and attention, in both attention bodies.
    #[test]
    fn a_value_length_mismatch_names_the_values_of_the_layer() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 4), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((1, 2, 6, 4), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((1, 1, 3, 5), DType::F32, &dev).unwrap();
        let sc = Scores::new(&mask, 0.5, 3, Attention::Cross, Ops::Composed);
        for (what, got) in [
            ("sdpa", sdpa(&q, &k, &v, &sc)),
            ("softcapped", softcapped_sdpa(&q, &k, &v, &sc, Some(50.0))),
        ] {
            let err = got.expect_err(what);
            let d = err.diagnosis().expect(what);
            assert_eq!(
                (d.layer, d.attention, d.tensor),
                (Some(3), Some(Attention::Cross), Some(TensorKind::Value)),
                "{what}: {d:?}"
            );
        }
    }

    /// Keys that disagree with the queries `[2, 4, 3, 8]` give the first disagreement's
    /// class and the key shape that would have fit.
    #[test]
    fn keys_that_disagree_with_the_queries_name_the_first_disagreement() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 3, 8), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((2, 1, 3, 5), DType::F32, &dev).unwrap();
        let sc = Scores::new(&mask, 0.5, 0, Attention::SelfAttn, Ops::Composed);
        for (keys, class, expected) in [
            ((1, 2, 5, 4), DiagnosisClass::Batch, [2, 2, 5, 4]),
            ((2, 2, 5, 4), DiagnosisClass::HeadDim, [2, 2, 5, 8]),
            ((2, 3, 5, 8), DiagnosisClass::KvHeads, [2, 4, 5, 8]),
        ] {
            let k = Tensor::zeros(keys, DType::F32, &dev).unwrap();
            let err = sdpa(&q, &k, &k, &sc).expect_err("keys disagree");
            let d = err.diagnosis().expect("a diagnosis");
            assert_eq!((d.class, d.tensor), (class, Some(TensorKind::Key)), "{d:?}");
            assert_eq!(d.expected_shape, expected, "{d:?}");
        }
    }
}
