//! The prefix placed in a fresh cache ([`prepare_cache`]), and one forward pass over
//! it ([`forward_logits`], in any ops mode): where prefill
//! and decoding start, and what a training step or a parity test compares.

use candle_core::{DType, Tensor};

use crate::engine::cache::{CacheConfig, ModelCache};
use crate::engine::diagnosis::{CandleExt, Result};
use crate::engine::model::{Forward, Model, Ops};
use crate::engine::prefix::{extend_mask, inject, PrefixEncoder, PrefixLayout};

/// Build the cache of `model` for `opts` and place the prefix in it, expanded to
/// `batch` rows (callers pass `B * R`: batch x beams, or x return sequences).
pub fn prepare_cache(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    layout: PrefixLayout,
    batch: usize,
) -> Result<ModelCache> {
    let g = model.geometry();
    let mut cache = cache.clone();
    if matches!(cache.mode, crate::engine::cache::CacheMode::Hybrid { .. })
        && cache.layer_windows.is_none()
    {
        cache.layer_windows = Some(model.layer_windows());
    }
    let mut mc = ModelCache::new(
        cache,
        model.family().legacy_layout(),
        g.num_layers,
        g.encoder_decoder,
    );
    mc.set_kv_heads(g.num_kv_heads);
    if let Some(p) = prefix {
        // per layer [batch, H, P, D] (self, and cross for encoder-decoders)
        let pkv = p.past_key_values(batch)?;
        inject(&mut mc, &pkv, layout, p.geometry.num_virtual_tokens)?;
    }
    Ok(mc)
}

/// Logits `[B, S, V]` of one forward pass over `input_ids: [B, S]` with the prefix in a
/// fresh cache, with the kernels of `ops` (the encoder's too; a training step or a
/// parity test compares [`Ops::Kernels`], the crate's own). Encoder-decoders:
/// `decoder_ids: [B, T]`, logits `[B, T, V]`.
pub fn forward_logits(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    ops: Ops,
    input_ids: &Tensor,
    decoder_ids: Option<&Tensor>,
) -> Result<(Tensor, ModelCache)> {
    let (b, s) = input_ids.dims2().ctx("input ids [B, S]")?;
    let dev = input_ids.device().clone();
    let p = prefix.map(|p| p.geometry.num_virtual_tokens).unwrap_or(0);
    let mut mc = prepare_cache(model, prefix, cache, PrefixLayout::Auto, b)?;
    let pad = Tensor::ones((b, s), DType::F32, &dev).ctx("mask")?;
    let (ids, encoded) = if model.geometry().encoder_decoder {
        let enc = model.encode(input_ids, &pad, ops)?;
        let dec = decoder_ids.cloned().ok_or_else(|| {
            crate::engine::diagnosis::EngineError::Config(
                "encoder-decoder needs decoder ids".into(),
            )
        })?;
        (dec, Some(enc))
    } else {
        (input_ids.clone(), None)
    };
    let t = ids.dim(1).ctx("ids")?;
    let mask = extend_mask(&Tensor::ones((b, t), DType::F32, &dev).ctx("mask")?, p)?;
    mc.next_step();
    let out = model.forward(
        &ids,
        &mut Forward {
            cache: &mut mc,
            mask: &mask,
            encoder: encoded.as_ref(),
            last_only: false,
            ops,
        },
    )?;
    Ok((out, mc))
}
