//! KV caches: one interface over eight modes, each declaring the layout it stores.
//!
//! The model's attention always computes keys and values in the standard layout
//! `[batch, kv_heads, seq, head_dim]` and hands them to [`ModelCache::update_self`].
//! The cache converts them to the layout it stores, checks them against what it
//! already holds (the prefix, then earlier tokens) and turns any disagreement into a
//! [`Diagnosis`](crate::engine::diagnosis::Diagnosis), appends, records a
//! [`TraceEvent`](crate::engine::trace::TraceEvent), and returns everything the
//! attention may read, back in the standard layout (the write path is in `update.rs`).
//!
//! The prefix is placed with [`ModelCache::seed`] *as given*, in whatever layout the
//! prefix builder chose, exactly like transformers' `DynamicCache.from_legacy_cache`:
//! a prefix shaped for the wrong layout is only noticed when the model appends to it,
//! which is where PEFT issue 2192 crashed.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};
use crate::engine::trace::{event, CacheOp, Trace};

mod check;
mod file;
pub mod hybrid;
mod layout;
mod merge;
pub mod quant;
mod ring;
mod stores;
mod update;

use check::{no_layer, select_rows};
pub use layout::Layout;
pub use merge::{merge_rows, Merged};
use stores::{select_pair, KvStore};

/// How keys and values are kept between forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum CacheMode {
    /// Nothing is kept: every step recomputes the whole sequence (prefix still injected).
    None,
    /// Append by concatenation (candle-nn `ConcatKvCache`; transformers `DynamicCache`).
    Dynamic,
    /// Preallocated to `max_len` positions, written in place (candle-nn `KvCache`;
    /// transformers `StaticCache`). Prefix + prompt + new tokens must fit.
    Static { max_len: usize },
    /// Keeps the last `window` positions in time order (transformers'
    /// `DynamicSlidingWindowLayer`); attention is limited to the same window.
    Sliding { window: usize },
    /// Keeps the last `window` positions in a ring of `window` slots with a head index
    /// (transformers' static sliding layers, mlx-lm `RotatingKVCache`, candle-nn
    /// `RotatingKvCache`): a decoding step overwrites the oldest slot in place. Reads
    /// are unrolled to time order, so it must give the tokens of `sliding`.
    Rotating { window: usize },
    /// The tuple layouts of older transformers: Bloom 3-D, GPT-BigCode fused K|V,
    /// standard 4-D for the other families.
    Legacy,
    /// The last `residual` positions in full precision, the older ones as `bits`-bit
    /// codes with a scale and zero point per (row, KV head, `head_dim` index) channel,
    /// dequantized when read (transformers' `QuantizedCache`; see [`quant`]). The
    /// prefix is quantized like any other position unless `prefix_full_precision`.
    /// Self-attention only: a T5 cross cache is kept exact.
    Quantized {
        bits: u8,
        residual: usize,
        prefix_full_precision: bool,
    },
    /// Per layer, a sliding store or a global one, as the model's layer types say
    /// ([`CacheConfig::layer_windows`]; see [`hybrid`]). The global layers append
    /// (`dynamic`, transformers >= 4.56), or with `max_len` are preallocated to that
    /// many positions (`static`: the `HybridCache` of transformers < 4.56).
    Hybrid { max_len: Option<usize> },
}

impl CacheMode {
    pub fn name(&self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Dynamic => "dynamic",
            CacheMode::Static { .. } => "static",
            CacheMode::Sliding { .. } => "sliding",
            CacheMode::Rotating { .. } => "rotating",
            CacheMode::Legacy => "legacy",
            CacheMode::Quantized { .. } => "quantized",
            CacheMode::Hybrid { .. } => "hybrid",
        }
    }
}

/// Settings of a model's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    pub mode: CacheMode,
    /// Attention window in positions (query at p sees keys in (p-W, p]). Required by
    /// `sliding` (its `window`); may be set for other modes to compare against them.
    pub window: Option<usize>,
    /// Historical transformers behaviour (before PR 34312): seeding the T5 cross cache
    /// with the prefix marked it "already computed", so the encoder's keys were never
    /// added. `false` is the fixed behaviour.
    pub cross_prefix_marks_updated: bool,
    /// How the causal mask of a prompt chunk (a forward pass of several queries after
    /// cached positions) is aligned: [`ChunkMask::LowerRight`] is the fix.
    pub chunk_mask: ChunkMask,
    /// Historical (llama.cpp issue 25295): restoring a saved `rotating` cache resets its
    /// ring head to slot 0, so the next step overwrites a slot that is not the oldest
    /// and reads the ring in the wrong order. `false` is the fixed behaviour.
    pub ring_head_lost_on_load: bool,
    /// `hybrid`: the attention window of each layer (`None`: global), from the model
    /// (`Model::layer_windows`; `generate::prepare_cache` fills it when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_windows: Option<Vec<Option<usize>>>,
}

impl CacheConfig {
    pub fn new(mode: CacheMode) -> Self {
        let window = match mode {
            CacheMode::Sliding { window } | CacheMode::Rotating { window } => Some(window),
            _ => None,
        };
        Self {
            mode,
            window,
            cross_prefix_marks_updated: false,
            chunk_mask: ChunkMask::LowerRight,
            ring_head_lost_on_load: false,
            layer_windows: None,
        }
    }
}

/// The causal mask of a forward pass with several queries `S` over `K` keys, when
/// earlier positions are cached (`S < K`: a prompt chunk after the prefix and the
/// chunks before it). Single-token decoding steps are never affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkMask {
    /// Query `i` sits at its absolute position and sees every earlier key (the
    /// triangle aligned to the lower right): the fix.
    #[default]
    LowerRight,
    /// Historical (executorch PR 21749): the chunk's triangle is aligned to the upper
    /// left, as if the chunk began right after the prefix, so its queries do not see
    /// the earlier chunks' positions. Silently wrong outputs.
    UpperLeft,
    /// Historical (candle issue 2153): the mask is built `[S, P + S]`, for the prefix
    /// and the chunk only, instead of `[S, K]`: the shape failure at the second chunk.
    Square,
}

/// What the attention reads after an update.
#[derive(Debug, Clone)]
pub struct KvView {
    /// `[B, KVH, K, D]`
    pub k: Tensor,
    /// `[B, KVH, K, D]`
    pub v: Tensor,
    /// Absolute position of the first key (0 unless a sliding cache evicted some).
    pub kv_start: usize,
}

#[derive(Debug, Clone)]
struct LayerCache {
    /// The prefix as seeded, not yet merged into `store` (raw layout as given).
    prefix: Option<(Tensor, Tensor)>,
    prefix_len: usize,
    /// What the layer keeps between passes, in the cache's mode ([`stores::for_mode`]).
    store: Box<dyn KvStore>,
    /// Positions written so far (prefix included), evicted ones included.
    seen: usize,
    /// `hybrid`: this layer's window (its store slides when set).
    window: Option<usize>,
}

#[derive(Debug, Clone)]
struct CrossCache {
    prefix: Option<(Tensor, Tensor)>,
    prefix_len: usize,
    /// `[B, KVH, P+E, D]`
    kv: Option<(Tensor, Tensor)>,
    /// transformers' `EncoderDecoderCache.is_updated[layer]`.
    is_updated: bool,
}

/// The cache of a whole model: one self-attention cache per layer, plus one
/// cross-attention cache per layer for encoder-decoder models, and the trace.
#[derive(Debug, Clone)]
pub struct ModelCache {
    pub config: CacheConfig,
    pub layout: Layout,
    layers: Vec<LayerCache>,
    cross: Vec<CrossCache>,
    /// Key/value heads of the self-attention cache, when known (set by
    /// [`ModelCache::set_kv_heads`], learned from every [`ModelCache::update_self`]):
    /// the bloom-legacy layout folds the batch into dimension 0 as `batch * heads`, so
    /// selecting batch rows ([`ModelCache::reorder`]) needs it.
    kv_heads: Option<usize>,
    pub trace: Trace,
}

fn shape(t: &Tensor) -> Vec<usize> {
    t.dims().to_vec()
}

/// The shapes of keys and values (None when absent): a trace event's stored shapes.
fn shapes(pair: Option<&(Tensor, Tensor)>) -> (Option<Vec<usize>>, Option<Vec<usize>>) {
    (pair.map(|(k, _)| shape(k)), pair.map(|(_, v)| shape(v)))
}

impl ModelCache {
    /// `legacy_layout` is the family's historical layout, used by `CacheMode::Legacy`.
    pub fn new(
        config: CacheConfig,
        legacy_layout: Layout,
        num_layers: usize,
        encoder_decoder: bool,
    ) -> Self {
        let layout = match config.mode {
            CacheMode::Legacy => legacy_layout,
            _ => Layout::Standard,
        };
        let cross = CrossCache {
            prefix: None,
            prefix_len: 0,
            kv: None,
            is_updated: false,
        };
        // `hybrid`: each layer's own window, from the model.
        let windows = match (config.mode, &config.layer_windows) {
            (CacheMode::Hybrid { .. }, Some(windows)) => windows.as_slice(),
            _ => &[],
        };
        let layers = (0..num_layers)
            .map(|i| {
                let window = windows.get(i).copied().flatten();
                LayerCache {
                    prefix: None,
                    prefix_len: 0,
                    store: stores::for_mode(config.mode, window),
                    seen: 0,
                    window,
                }
            })
            .collect();
        Self {
            layers,
            cross: if encoder_decoder {
                vec![cross; num_layers]
            } else {
                vec![]
            },
            layout,
            config,
            kv_heads: None,
            trace: Trace::default(),
        }
    }

    /// Declare the number of key/value heads (the model geometry's `num_kv_heads`),
    /// so that a bloom-legacy prefix can be reordered before the first forward pass.
    pub fn set_kv_heads(&mut self, kv_heads: usize) {
        self.kv_heads = Some(kv_heads);
    }

    /// The number of key/value heads, if known.
    pub fn kv_heads(&self) -> Option<usize> {
        self.kv_heads
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The attention window, if attention is limited to one.
    pub fn window(&self) -> Option<usize> {
        self.config.window
    }

    /// Positions already in the cache before the next forward pass: the absolute
    /// position of the next query. With `none` this stays at the prefix length.
    pub fn past_len(&self) -> usize {
        self.layers.first().map(|l| l.seen).unwrap_or(0)
    }

    /// `hybrid`: the trace's name of a self-attention layer's store (`sliding/W`,
    /// `global`); `None` in the other modes.
    fn store_name(&self, layer: usize, attention: Attention) -> Option<String> {
        let hybrid = matches!(self.config.mode, CacheMode::Hybrid { .. })
            && attention == Attention::SelfAttn;
        hybrid.then(|| hybrid::describe(self.layers.get(layer).and_then(|l| l.window)))
    }

    /// Number of prefix positions seeded into layer 0's self-attention cache.
    pub fn prefix_len(&self) -> usize {
        self.layers.first().map(|l| l.prefix_len).unwrap_or(0)
    }

    /// Place a prefix into a layer's cache, in whatever layout it was shaped for.
    /// `prefix_len` is the number of virtual tokens P (the shape may not say which
    /// dimension holds it when the layout is wrong).
    pub fn seed(
        &mut self,
        layer: usize,
        attention: Attention,
        k: Tensor,
        v: Tensor,
        prefix_len: usize,
    ) -> Result<()> {
        let mut e = event(layer, attention, CacheOp::Seed, self.layout);
        e.shapes.key_written = Some(shape(&k));
        e.shapes.value_written = Some(shape(&v));
        e.positions = Some((0, prefix_len));
        e.store = self.store_name(layer, attention);
        match attention {
            Attention::SelfAttn => {
                let l = self
                    .layers
                    .get_mut(layer)
                    .ok_or_else(|| no_layer(layer, attention))?;
                l.prefix = Some((k, v));
                l.prefix_len = prefix_len;
                l.seen = prefix_len;
            }
            Attention::Cross => {
                let mark = self.config.cross_prefix_marks_updated;
                let c = self
                    .cross
                    .get_mut(layer)
                    .ok_or_else(|| no_layer(layer, attention))?;
                if mark {
                    // Historical: the prefix alone became the "computed" cross cache.
                    c.kv = Some((k.clone(), v.clone()));
                    c.is_updated = true;
                }
                c.prefix = Some((k, v));
                c.prefix_len = prefix_len;
            }
        }
        self.trace.push(e);
        Ok(())
    }

    /// Number of cross-prefix positions of `layer` (0 without a prefix).
    pub fn cross_prefix_len(&self, layer: usize) -> usize {
        self.cross.get(layer).map(|c| c.prefix_len).unwrap_or(0)
    }

    /// Record the mask the attention applied in the event of this step and layer.
    pub fn note_mask(&mut self, layer: usize, attention: Attention, mask: &[usize]) {
        if let Some(e) = self.trace.last_mut(layer, attention) {
            e.mask = Some(mask.to_vec());
        }
    }

    /// Stored self-attention key shape of `layer` (None when empty): what a test
    /// inspects after a prefill.
    pub fn stored_key_shape(&self, layer: usize) -> Option<Vec<usize>> {
        let l = self.layers.get(layer)?;
        let held = match l.store.keeps_positions() {
            true => l.store.held(),
            false => l.prefix.clone(),
        };
        held.map(|(k, _)| shape(&k))
    }

    /// What layer `layer`'s self-attention cache holds, raw, in the layout it stores
    /// (the not-yet-merged prefix if no forward pass appended to it yet): keys and
    /// values, e.g. `([B, KVH, K, D], [B, KVH, K, D])` for the standard layout. A
    /// `quantized` store gives what attention reads: its codes dequantized, between the
    /// exact prefix (if pinned) and the exact last R positions.
    pub fn stored_self(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        self.layers.get(layer)?.held()
    }

    /// [`ModelCache::stored_self`] with a `rotating` ring unrolled to time order: what
    /// two caches of the same positions are compared by.
    pub fn stored_self_in_time_order(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(l) = self.layers.get(layer) else {
            return Ok(None);
        };
        match &l.prefix {
            Some(p) => Ok(Some(p.clone())),
            None => l.store.in_time_order().at(
                Site::new(layer, Attention::SelfAttn, TensorKind::Key),
                "unroll ring",
            ),
        }
    }

    /// What layer `layer`'s cross-attention cache holds: the computed keys/values
    /// `([B, KVH, P+E, D], [B, KVH, P+E, D])`, else the cross prefix `[B, KVH, P, D]`.
    pub fn stored_cross(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let c = self.cross.get(layer)?;
        c.kv.clone().or_else(|| c.prefix.clone())
    }

    /// Select the batch rows `indices` (`[N']`, each below the current batch N) of every
    /// stored tensor, in every layer, self and cross, in every store and layout, the
    /// not-yet-merged prefix included: row `i` afterwards is row `indices[i]` before.
    ///
    /// Beam search calls it before each step with the source beam of every row
    /// (transformers' `Cache.reorder_cache(beam_idx)`); repeated indices expand a batch
    /// (`[0, 0, 1, 1]`: two rows per input row). Standard keys `[N, KVH, K, D]` and
    /// bigcode-fused `[N, K, 2D]` are selected along dimension 0; bloom-legacy keys
    /// `[N*KVH, D, K]` and values `[N*KVH, K, D]` are viewed as `[N, KVH, ...]` first, so
    /// the heads of a row move together. The static store is rebuilt at its capacity
    /// from the selected rows. Records one [`CacheOp::Reorder`] event per layer and
    /// attention.
    pub fn reorder(&mut self, indices: &[u32]) -> Result<()> {
        let layout = self.layout;
        let kv_heads = self.kv_heads;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let att = Attention::SelfAttn;
            let mut e = event(i, att, CacheOp::Reorder, layout);
            (e.shapes.key_before, e.shapes.value_before) = shapes(l.held().as_ref());
            let mut sel = |t: &Tensor, kind: TensorKind| {
                select_rows(t, layout, kind, kv_heads, indices, Site::new(i, att, kind))
            };
            if let Some(prefix) = &l.prefix {
                l.prefix = Some(select_pair(&mut sel, prefix)?);
            }
            l.store
                .select_rows(&mut sel, Site::new(i, att, TensorKind::Key))?;
            (e.shapes.key_after, e.shapes.value_after) = shapes(l.held().as_ref());
            self.trace.push(e);
        }
        for (i, c) in self.cross.iter_mut().enumerate() {
            // transformers' cross cache has always been 4-D: standard layout.
            let att = Attention::Cross;
            let std = Layout::Standard;
            let mut e = event(i, att, CacheOp::Reorder, std);
            let mut sel = |t: &Tensor, kind: TensorKind| {
                select_rows(t, std, kind, None, indices, Site::new(i, att, kind))
            };
            (e.shapes.key_before, e.shapes.value_before) =
                shapes(c.kv.as_ref().or(c.prefix.as_ref()));
            if let Some(prefix) = &c.prefix {
                c.prefix = Some(select_pair(&mut sel, prefix)?);
            }
            if let Some(kv) = &c.kv {
                c.kv = Some(select_pair(&mut sel, kv)?);
            }
            (e.shapes.key_after, e.shapes.value_after) =
                shapes(c.kv.as_ref().or(c.prefix.as_ref()));
            self.trace.push(e);
        }
        Ok(())
    }

    /// Start a new forward pass in the trace.
    pub fn next_step(&mut self) {
        self.trace.next_step();
    }
}

impl LayerCache {
    /// What the layer holds, raw: the unmerged prefix, else the store's contents (a
    /// `quantized` store's dequantized, in time order).
    fn held(&self) -> Option<(Tensor, Tensor)> {
        match &self.prefix {
            Some(p) => Some(p.clone()),
            None => self.store.held(),
        }
    }
}
