//! Merging per-row caches of different fill levels into one batch, as
//! continuous-batching servers do when a request joins a running batch.
//!
//! Each row's cache holds `fill_i` positions (its prefix, prompt and the tokens fed so
//! far); the merged batch holds `L = max fill_i` positions per row, each row
//! left-padded with `L - fill_i` empty slots that its attention mask hides. Keys and
//! values are the standard layout `[1, KVH, fill_i, D]` per row, `[B, KVH, L, D]`
//! merged.

use super::stores::{Dynamic, KvStore};
use super::{shapes, CacheMode, LayerCache, ModelCache};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result, Site, TensorKind};
use crate::engine::trace::{event, CacheOp};
use candle_core::Tensor;

/// The merged cache and the padding mask of its slots `[B, L]` (1 = held position).
pub struct Merged {
    pub cache: ModelCache,
    /// Per row: 0 for the `L - fill` padding slots, then 1.
    pub mask: Vec<Vec<f32>>,
}

/// Merge the one-row `dynamic` caches `rows` into one batch. With
/// `fill_from_first_row` (historical, mlx-lm's rotating-cache merges) every row is
/// sliced or padded to the first row's fill level and all its slots count as held:
/// longer rows lose their oldest positions (the prefix first), shorter ones attend to
/// empty slots.
pub fn merge_rows(rows: &[ModelCache], fill_from_first_row: bool) -> Result<Merged> {
    let first = rows
        .first()
        .ok_or_else(|| EngineError::Config("merge: no rows".into()))?;
    if let Some(r) = rows.iter().find(|r| r.config.mode != CacheMode::Dynamic) {
        return Err(EngineError::Config(format!(
            "merge: only `dynamic` caches are merged, got `{}`",
            r.config.mode.name()
        )));
    }
    let fills: Vec<usize> = rows.iter().map(|r| r.past_len()).collect();
    let width = if fill_from_first_row {
        fills[0]
    } else {
        fills.iter().copied().max().unwrap_or(0)
    };
    let mut merged = ModelCache::new(
        first.config.clone(),
        first.layout,
        first.num_layers(),
        false,
    );
    merged.kv_heads = first.kv_heads;
    // The trace goes on from the first row's run alone: the merge is the next step.
    merged.trace = first.trace.clone();
    merged.next_step();
    for layer in 0..first.num_layers() {
        let site = Site::new(layer, Attention::SelfAttn, TensorKind::Key);
        let mut ks = vec![];
        let mut vs = vec![];
        let mut e = event(layer, Attention::SelfAttn, CacheOp::Merge, first.layout);
        for (r, &fill) in rows.iter().zip(&fills) {
            // [1, KVH, fill, D] each
            let (k, v) = r.stored_self(layer).ok_or_else(|| {
                EngineError::Config(format!("merge: a row's layer {layer} cache is empty"))
            })?;
            let fit = |t: &Tensor| -> Result<Tensor> {
                if fill >= width {
                    return t
                        .narrow(2, fill - width, width)
                        .at(site, "merge: slice row");
                }
                let (b, h, _, d) = t.dims4().at(site, "merge: row keys")?;
                let pad = Tensor::zeros((b, h, width - fill, d), t.dtype(), t.device())
                    .at(site, "merge: padding")?;
                Tensor::cat(&[&pad, t], 2).at(site, "merge: pad row")
            };
            ks.push(fit(&k)?);
            vs.push(fit(&v)?);
        }
        // [B, KVH, L, D]
        let k = Tensor::cat(&ks, 0).at(site, "merge: keys")?;
        let v = Tensor::cat(&vs, 0).at(site, "merge: values")?;
        e.shapes.key_written = Some(k.dims().to_vec());
        e.shapes.value_written = Some(v.dims().to_vec());
        let store = Dynamic::holding(&k, &v).at(site, "merge: store")?;
        (e.shapes.key_after, e.shapes.value_after) = shapes(store.held().as_ref());
        merged.layers[layer] = LayerCache {
            prefix: None,
            prefix_len: first.prefix_len(),
            store: Box::new(store),
            seen: width,
            window: None,
        };
        merged.trace.push(e);
    }
    let mask = fills
        .iter()
        .map(|&fill| {
            let held = if fill_from_first_row { width } else { fill };
            let mut row = vec![0f32; width - held.min(width)];
            row.resize(width, 1.0);
            row
        })
        .collect();
    Ok(Merged {
        cache: merged,
        mask,
    })
}
