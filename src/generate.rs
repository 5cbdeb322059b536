//! Prefill and decoding with a prefix in a cache: the path every engine test, scenario
//! and bug reproduction drives. Greedy decoding here; sampling and beams build on it.

use candle_core::{DType, Tensor, D};

use crate::cache::{CacheConfig, CacheMode, ModelCache};
use crate::check::{CandleExt, Result};
use crate::model::{Encoded, Forward, Model};
use crate::prefix::{extend_mask, inject, PrefixEncoder, PrefixLayout};
use crate::trace::Trace;

/// How one generation runs.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub cache: CacheConfig,
    /// How the prefix is shaped before it enters the cache.
    pub layout: PrefixLayout,
    pub max_new_tokens: usize,
    /// Prepend P visible columns to the attention mask (the fix); `false` reproduces
    /// the historical "mask not extended by P" bug.
    pub extend_mask: bool,
}

impl DecodeOptions {
    pub fn new(cache: CacheConfig, max_new_tokens: usize) -> Self {
        Self {
            cache,
            layout: PrefixLayout::Auto,
            max_new_tokens,
            extend_mask: true,
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct DecodeOutput {
    /// Generated ids per batch row: `[B][max_new_tokens]`.
    pub tokens: Vec<Vec<u32>>,
    /// Next-token logits of every step, `[B, V]` each (step 0 is the prefill).
    pub logits: Vec<Tensor>,
    /// The cache after the last step; its `trace` holds every cache event.
    pub cache: ModelCache,
}

/// Build the cache of `model` for `opts` and place the prefix in it.
pub fn prepare_cache(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    layout: PrefixLayout,
    batch: usize,
) -> Result<ModelCache> {
    let g = model.geometry();
    let mut mc = ModelCache::new(
        cache.clone(),
        model.family().legacy_layout(),
        g.num_layers,
        g.encoder_decoder,
    );
    if let Some(p) = prefix {
        let pkv = p.past_key_values(batch)?;
        inject(&mut mc, &pkv, layout, p.geometry.num_virtual_tokens)?;
    }
    Ok(mc)
}

/// Greedy generation of `opts.max_new_tokens` tokens after `input_ids: [B, S]` (u32),
/// with an optional padding mask `pad: [B, S]` (1 = token; defaults to all ones).
/// For encoder-decoders `input_ids` feed the encoder and the decoder starts from its
/// start token.
pub fn greedy(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> Result<DecodeOutput> {
    greedy_traced(model, prefix, opts, input_ids, pad).0
}

/// [`greedy`], also returning the trace recorded up to the end or to the failure
/// (what a bug report shows: every cache event before the diagnosis).
pub fn greedy_traced(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> (Result<DecodeOutput>, Trace) {
    let b = match input_ids.dims2().ctx("input ids [B, S]") {
        Ok((b, _)) => b,
        Err(e) => return (Err(e), Trace::default()),
    };
    let mut cache = match prepare_cache(model, prefix, &opts.cache, opts.layout, b) {
        Ok(c) => c,
        Err(e) => return (Err(e), Trace::default()),
    };
    match decode(model, prefix, opts, input_ids, pad, &mut cache) {
        Ok((tokens, logits)) => {
            let trace = cache.trace.clone();
            (
                Ok(DecodeOutput {
                    tokens,
                    logits,
                    cache,
                }),
                trace,
            )
        }
        Err(e) => (Err(e), cache.trace),
    }
}

/// Prefill and greedy steps on a prepared cache: `(tokens [B][n], logits n x [B, V])`.
fn decode(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
    cache: &mut ModelCache,
) -> Result<(Vec<Vec<u32>>, Vec<Tensor>)> {
    let (b, s) = input_ids.dims2().ctx("input ids [B, S]")?;
    let dev = input_ids.device().clone();
    let p = prefix.map(|p| p.geometry.num_virtual_tokens).unwrap_or(0);
    let pad = match pad {
        Some(m) => m.to_dtype(DType::F32).ctx("padding mask")?,
        None => Tensor::ones((b, s), DType::F32, &dev).ctx("padding mask")?,
    };
    let ones = |n: usize| Tensor::ones((b, n), DType::F32, &dev).ctx("mask");
    let with_prefix = |m: &Tensor| -> Result<Tensor> {
        if opts.extend_mask && p > 0 {
            extend_mask(m, p)
        } else {
            Ok(m.clone())
        }
    };

    // Encoder-decoders: encode once, decode from the start token.
    let encoded: Option<Encoded> = if model.geometry().encoder_decoder {
        Some(model.encode(input_ids, &pad)?)
    } else {
        None
    };
    let (mut seq, mut seq_pad) = match &encoded {
        Some(_) => {
            let start =
                Tensor::full(model.decoder_start_token_id(), (b, 1), &dev).ctx("start token")?;
            (start, ones(1)?)
        }
        None => (input_ids.to_dtype(DType::U32).ctx("ids")?, pad.clone()),
    };
    let recompute = matches!(opts.cache.mode, CacheMode::None);
    let mut tokens: Vec<Vec<u32>> = vec![vec![]; b];
    let mut logits = vec![];
    let mut next_input = seq.clone();
    for step in 0..opts.max_new_tokens {
        cache.next_step();
        let mask = with_prefix(&seq_pad)?;
        let ids = if recompute || step == 0 {
            &seq
        } else {
            &next_input
        };
        let out = model.forward(
            ids,
            &mut Forward {
                cache,
                mask: &mask,
                encoder: encoded.as_ref(),
            },
        )?;
        // [B, V]
        let last = out
            .narrow(1, out.dim(1).ctx("logits")? - 1, 1)
            .and_then(|l| l.squeeze(1))
            .ctx("last logits")?;
        let next = last.argmax(D::Minus1).ctx("argmax")?; // [B]
        for (row, t) in next.to_vec1::<u32>().ctx("tokens")?.into_iter().enumerate() {
            tokens[row].push(t);
        }
        logits.push(last);
        next_input = next.unsqueeze(1).ctx("next token")?; // [B, 1]
        seq = Tensor::cat(&[&seq, &next_input], 1).ctx("append token")?;
        seq_pad = Tensor::cat(&[&seq_pad, &ones(1)?], 1).ctx("append mask")?;
    }
    Ok((tokens, logits))
}

/// Logits `[B, S, V]` of one forward pass over `input_ids: [B, S]` with the prefix in a
/// fresh cache: what a training step or a parity test compares.
pub fn forward_logits(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    input_ids: &Tensor,
    decoder_ids: Option<&Tensor>,
) -> Result<(Tensor, ModelCache)> {
    let (b, s) = input_ids.dims2().ctx("input ids [B, S]")?;
    let dev = input_ids.device().clone();
    let p = prefix.map(|p| p.geometry.num_virtual_tokens).unwrap_or(0);
    let mut mc = prepare_cache(model, prefix, cache, PrefixLayout::Auto, b)?;
    let pad = Tensor::ones((b, s), DType::F32, &dev).ctx("mask")?;
    let (ids, encoded) = if model.geometry().encoder_decoder {
        let enc = model.encode(input_ids, &pad)?;
        let dec = decoder_ids.cloned().ok_or_else(|| {
            crate::check::EngineError::Config("encoder-decoder needs decoder ids".into())
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
        },
    )?;
    Ok((out, mc))
}
