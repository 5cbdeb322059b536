//! Continuous batching (`generate.merge_rows_at: K`): every input row is generated
//! alone, without its padding, up to step K, as a server runs requests that arrive at
//! different times; then the per-row caches, of different fill levels, are merged
//! into one left-padded batch ([`crate::engine::cache::merge_rows`]) that generates the
//! remaining tokens. Each row must generate what it generates alone (the runner
//! checks it, see [`crate::engine::divergence::check_rows_alone`]).
//!
//! Greedy decoding of decoder-only models on a `dynamic` cache, without an EOS.

use candle_core::{DType, Tensor, D};

use crate::engine::cache::{merge_rows, CacheMode, ModelCache};
use crate::engine::diagnosis::{CandleExt, EngineError, Result};
use crate::engine::generate::{DecodeOptions, DecodeOutput, Generation, Strategy};
use crate::engine::model::{Forward, Model};
use crate::engine::prefix::PrefixEncoder;
use crate::engine::trace::Trace;

/// Why `opts` cannot merge rows at step `at` of a model of this kind, if it cannot.
pub fn unsupported(opts: &DecodeOptions, at: usize, encoder_decoder: bool) -> Option<String> {
    if !matches!(opts.request.strategy, Strategy::Greedy) {
        return Some("merging rows needs greedy decoding".into());
    }
    if encoder_decoder {
        return Some(
            "merging rows is for decoder-only models (an encoder-decoder's rows have encoder outputs of other lengths)".into(),
        );
    }
    if opts.cache.mode != CacheMode::Dynamic {
        return Some(format!(
            "merging rows needs `cache.mode: dynamic`, not `{}`",
            opts.cache.mode.name()
        ));
    }
    if opts.request.eos_token_id.is_some() {
        return Some(
            "merging rows does not support an EOS yet (rows that stop before the merge)".into(),
        );
    }
    if opts.save_at.is_some() {
        return Some("merging rows and `cache.save_at` do not combine".into());
    }
    if at + 1 >= opts.request.max_new_tokens {
        return Some(format!(
            "merge_rows_at must be a step before the last (0 to {}), got {at}",
            opts.request.max_new_tokens.saturating_sub(2)
        ));
    }
    None
}

/// Generate `ids: [B, S]` (u32) with the left-padding mask `pad: [B, S]` (1 = token):
/// each row alone for steps `0..=at`, then all rows as one merged batch. With
/// `fill_from_first_row` (historical) the merge slices every row to the first row's
/// fill level. Returns `B` rows of `opts.request.max_new_tokens` tokens, the logits `[B, V]`
/// of every step, and the trace: the first row's run alone, the merge, the batch.
pub fn generate_merged(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    ids: &Tensor,
    pad: &Tensor,
    at: usize,
    fill_from_first_row: bool,
) -> (Result<DecodeOutput>, Trace) {
    let mut trace = Trace::default();
    let out = run(
        model,
        prefix,
        opts,
        (ids, pad),
        at,
        fill_from_first_row,
        &mut trace,
    );
    (out, trace)
}

/// [`generate_merged`]'s body; `ids, pad: [B, S]`. The trace is filled as it goes, so
/// that it is kept when a step fails.
fn run(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    (ids, pad): (&Tensor, &Tensor),
    at: usize,
    fill_from_first_row: bool,
    trace: &mut Trace,
) -> Result<DecodeOutput> {
    if let Some(why) = unsupported(opts, at, model.geometry().encoder_decoder) {
        return Err(EngineError::Config(format!("generate: {why}")));
    }
    let (b, s) = ids.dims2().ctx("input ids [B, S]")?;
    let mask: Vec<Vec<f32>> = pad
        .to_dtype(DType::F32)
        .and_then(|m| m.to_vec2())
        .ctx("padding mask [B, S]")?;
    // Each row alone, unpadded, for steps 0..=at.
    let mut early = opts.clone();
    early.request.max_new_tokens = at + 1;
    let rows = Generation {
        model,
        prefix,
        opts: &early,
        ids,
        pad: Some(pad),
    };
    let mut alone: Vec<DecodeOutput> = Vec::with_capacity(b);
    for (i, row) in mask.iter().enumerate().take(b) {
        let start = row
            .iter()
            .position(|m| *m > 0.5)
            .unwrap_or(s.saturating_sub(1));
        alone.push(rows.row_alone(i, start)?);
    }
    let caches: Vec<ModelCache> = alone.iter().map(|o| o.cache.clone()).collect();
    let merged = merge_rows(&caches, fill_from_first_row)?;
    let mut cache = merged.cache;
    let dev = ids.device().clone();
    let width = merged.mask.first().map_or(0, Vec::len);
    // [B, L]
    let mut m = Tensor::from_vec(merged.mask.concat(), (b, width), &dev).ctx("merged mask")?;
    let mut tokens: Vec<Vec<u32>> = alone
        .iter()
        .map(|o| o.tokens.first().cloned().unwrap_or_default())
        .collect();
    // [B, V] per step: the rows' own logits up to the merge.
    let mut logits: Vec<Tensor> = (0..=at)
        .map(|step| {
            let rows: Vec<&Tensor> = alone.iter().filter_map(|o| o.logits.get(step)).collect();
            Tensor::cat(&rows, 0).ctx("logits of the rows alone")
        })
        .collect::<Result<_>>()?;
    let last: Vec<u32> = tokens
        .iter()
        .map(|t| t.last().copied().unwrap_or(0))
        .collect();
    let mut next = Tensor::from_vec(last, (b, 1), &dev).ctx("next token")?; // [B, 1]
    let run = (|| -> Result<()> {
        for _ in at + 1..opts.request.max_new_tokens {
            cache.next_step();
            // [B, L + steps]: the fed token is held from now on.
            m = Tensor::cat(
                &[&m, &Tensor::ones((b, 1), DType::F32, &dev).ctx("mask")?],
                1,
            )
            .ctx("extend mask")?;
            let out = model.forward(
                &next,
                &mut Forward {
                    cache: &mut cache,
                    mask: &m,
                    encoder: None,
                    last_only: true,
                    ops: opts.ops,
                },
            )?;
            // [B, V]
            let l = out.squeeze(1).ctx("last logits")?;
            let chosen: Vec<u32> = l
                .argmax(D::Minus1)
                .and_then(|t| t.to_vec1())
                .ctx("argmax")?;
            for (row, t) in tokens.iter_mut().zip(&chosen) {
                row.push(*t);
            }
            logits.push(l);
            next = Tensor::from_vec(chosen, (b, 1), &dev).ctx("next token")?;
        }
        Ok(())
    })();
    *trace = cache.trace.clone();
    run?;
    Ok(DecodeOutput {
        tokens,
        logits,
        scores: None,
        cache,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cache::CacheConfig;

    fn opts(mode: CacheMode, new: usize) -> DecodeOptions {
        DecodeOptions::new(CacheConfig::new(mode), new)
    }

    #[test]
    fn only_greedy_decoder_only_dynamic_runs_without_eos_or_save_merge() {
        let ok = opts(CacheMode::Dynamic, 4);
        assert_eq!(unsupported(&ok, 0, false), None);
        assert_eq!(unsupported(&ok, 2, false), None, "the step before the last");
        let last = unsupported(&ok, 3, false).unwrap();
        assert!(
            last.contains("a step before the last (0 to 2), got 3"),
            "{last}"
        );
        assert!(unsupported(&ok, 0, true).unwrap().contains("decoder-only"));
        let sliding = unsupported(&opts(CacheMode::Sliding { window: 4 }, 4), 0, false);
        assert!(sliding.unwrap().contains("not `sliding`"));
        let mut eos = ok.clone();
        eos.request.eos_token_id = Some(1);
        assert!(unsupported(&eos, 0, false).unwrap().contains("EOS"));
        let mut saved = ok.clone();
        saved.save_at = Some(0);
        assert!(unsupported(&saved, 0, false).unwrap().contains("save_at"));
        let beams = ok.clone().with_strategy(Strategy::Beam {
            num_beams: 2,
            length_penalty: 1.0,
            early_stopping: false,
        });
        assert!(unsupported(&beams, 0, false).unwrap().contains("greedy"));
    }
}
