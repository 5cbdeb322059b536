//! One store per cache mode behind [`KvStore`]: what a layer's self-attention cache
//! holds between forward passes, how a step is appended to it, how its batch rows are
//! selected and how it is written to and read from a cache file.
//!
//! [`for_mode`] is the one place that picks a layer's store from the mode. The small
//! stores live here (`none`, `dynamic`, `static`, and `sliding` and `legacy` in one); a store with
//! state of its own lives in its own file (`ring.rs`: `rotating`, `quant.rs`:
//! `quantized`). The layer around a store ([`super::ModelCache`]) keeps what every
//! mode shares: the prefix as seeded until the first append, the prefix length, the
//! positions seen, the layout conversions, the checks and the trace.

use candle_core::Tensor;
use candle_nn::kv_cache::{ConcatKvCache, KvCache};

use super::file::{LayerFile, SavedLayer};
use super::{hybrid, quant::Quantized, ring::Ring, CacheMode, Layout};
use crate::engine::diagnosis::{CandleExt, Result, Site, TensorKind};

/// Selects batch rows of one stored tensor (a key with [`TensorKind::Key`], a value
/// with [`TensorKind::Value`]): `[N, ...]` -> `[N', ...]` in the stored layout.
pub(super) type Select<'a> = &'a mut dyn FnMut(&Tensor, TensorKind) -> Result<Tensor>;

/// One append to a store: the step's keys and values, converted to the stored layout.
pub(super) struct Step<'a> {
    /// The layout the store keeps (of `k`, `v` and the prefix).
    pub layout: Layout,
    /// The prefix as seeded, raw, when it joins the store at this step: keys and
    /// values, e.g. `([B, KVH, P, D], [B, KVH, P, D])` for the standard layout.
    pub prefix: Option<&'a (Tensor, Tensor)>,
    /// The step's keys, e.g. `[B, KVH, S, D]` for the standard layout.
    pub k: &'a Tensor,
    /// The step's values, e.g. `[B, KVH, S, D]` for the standard layout.
    pub v: &'a Tensor,
    /// Positions a store with a window keeps between passes.
    pub keep: usize,
    pub site_k: Site,
    pub site_v: Site,
}

impl Step<'_> {
    /// The positions before this step, in time order: the prefix when it joins the
    /// store now, else what `held` gives (`[B, KVH, L, D]` each, standard layout).
    pub fn before(
        &self,
        held: impl FnOnce() -> Result<Option<(Tensor, Tensor)>>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        match self.prefix {
            Some(p) => Ok(Some(p.clone())),
            None => held(),
        }
    }

    /// `before` then the step's keys and values along the layout's sequence dimension
    /// (`[B, KVH, L + S, D]` each, standard layout): what the attention reads.
    pub fn after(&self, before: Option<&(Tensor, Tensor)>) -> Result<(Tensor, Tensor)> {
        let Some((bk, bv)) = before else {
            return Ok((self.k.clone(), self.v.clone()));
        };
        Ok((
            self.layout
                .cat(bk, self.k, TensorKind::Key)
                .at(self.site_k, "append keys")?,
            self.layout
                .cat(bv, self.v, TensorKind::Value)
                .at(self.site_v, "append values")?,
        ))
    }
}

/// How many positions a store holds at most, and how to say that it ran out.
pub(super) struct Capacity {
    pub positions: usize,
    /// The store, in the diagnosis' message.
    pub what: &'static str,
    pub hint: &'static str,
}

/// A layer's self-attention store. Shapes are given for the standard layout
/// `[B, KVH, K, D]`; the `legacy` store keeps the family's legacy layout instead
/// (bloom-legacy keys `[B*KVH, D, K]` and values `[B*KVH, K, D]`, bigcode-fused
/// `[B, K, 2D]` for both).
pub(super) trait KvStore: CloneStore + std::fmt::Debug + Send + Sync {
    /// What the store holds, raw, in the layout it stores: keys and values
    /// `([B, KVH, K, D], [B, KVH, K, D])` (a ring in ring order; a `quantized` store
    /// its dequantized view in time order); None when empty. Its shapes are the
    /// trace's stored shapes.
    fn held(&self) -> Option<(Tensor, Tensor)>;

    /// [`KvStore::held`] in time order (a ring unrolled): what two caches of the same
    /// positions are compared by, and what a window store appends to.
    fn in_time_order(&self) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        Ok(self.held())
    }

    /// Store `step` (its prefix first, when it joins the store now) and return what
    /// the attention reads, in the stored layout: keys and values
    /// `([B, KVH, L + S, D], [B, KVH, L + S, D])`, the `L` positions before the step
    /// (all of them, also those a window store drops now) and the step's `S`.
    fn append(&mut self, step: &Step) -> Result<(Tensor, Tensor)>;

    /// Select the batch rows of every part of the store with `sel` (for beams: row `i`
    /// afterwards is row `indices[i]` before, [`super::ModelCache::reorder`]). `site`
    /// names the layer.
    fn select_rows(&mut self, sel: Select, site: Site) -> Result<()>;

    /// Write what the store holds into `tensors`, named `{name}key`, `{name}value`, ...
    /// (`name` is `self.{layer}.`), and its own state into `layer`.
    fn save(&self, name: &str, tensors: &mut Vec<(String, Tensor)>, layer: &mut SavedLayer) {
        let _ = layer;
        if let Some((k, v)) = self.held() {
            push_pair(tensors, name, k, v);
        }
    }

    /// Fill this (empty) store with what [`KvStore::save`] wrote for the layer, as the
    /// file's state for it announces.
    fn load(&mut self, from: &mut LayerFile) -> Result<()>;

    /// Whether the store keeps the positions appended. `false` (`none`): nothing is
    /// kept, the prefix stays as seeded and the positions seen stay at its length.
    fn keeps_positions(&self) -> bool {
        true
    }

    /// Whether the store drops its oldest positions (a window), so that what the
    /// attention reads may begin after position 0.
    fn evicts(&self) -> bool {
        false
    }

    /// The positions the store can hold, when preallocated.
    fn capacity(&self) -> Option<Capacity> {
        None
    }

    /// A ring's head, the slot the next position goes to (the trace's `ring_head`).
    fn ring_head(&self) -> Option<usize> {
        None
    }
}

/// Cloning a boxed store: a cache is cloned whole (e.g. a run and its reference).
pub(super) trait CloneStore {
    fn clone_box(&self) -> Box<dyn KvStore>;
}

impl<T: KvStore + Clone + 'static> CloneStore for T {
    fn clone_box(&self) -> Box<dyn KvStore> {
        Box::new(self.clone())
    }
}

impl Clone for Box<dyn KvStore> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

const STATIC_WHAT: &str = "static cache";
const STATIC_HINT: &str = "the static cache was sized for the prompt and new tokens without the P virtual tokens (max_len must be >= P + prompt + max_new_tokens)";

/// The store of a layer in `mode`; `window` is the layer's own window (`hybrid`).
pub(super) fn for_mode(mode: CacheMode, window: Option<usize>) -> Box<dyn KvStore> {
    match (mode, window) {
        (CacheMode::None, _) => Box::new(Recompute),
        (CacheMode::Dynamic, _) | (CacheMode::Hybrid { max_len: None }, None) => {
            Box::new(Dynamic::default())
        }
        (CacheMode::Static { max_len }, _) => {
            Box::new(Static::new(max_len, STATIC_WHAT, STATIC_HINT))
        }
        (
            CacheMode::Hybrid {
                max_len: Some(max_len),
            },
            None,
        ) => Box::new(Static::new(
            max_len,
            hybrid::GLOBAL_LAYER,
            hybrid::CAPACITY_HINT,
        )),
        (CacheMode::Sliding { .. }, _) | (CacheMode::Hybrid { .. }, Some(_)) => {
            Box::new(Kept::sliding())
        }
        (CacheMode::Rotating { .. }, _) => Box::new(Ring::default()),
        (CacheMode::Legacy, _) => Box::new(Kept::legacy()),
        (
            CacheMode::Quantized {
                bits,
                residual,
                prefix_full_precision,
            },
            _,
        ) => Box::new(Quantized::new(bits, residual, prefix_full_precision)),
    }
}

/// `tensors` gains `{name}key` and `{name}value`.
pub(super) fn push_pair(tensors: &mut Vec<(String, Tensor)>, name: &str, k: Tensor, v: Tensor) {
    tensors.push((format!("{name}key"), k));
    tensors.push((format!("{name}value"), v));
}

/// Keys and values with their rows selected by `sel` (`[N, ...]` -> `[N', ...]`).
pub(super) fn select_pair(sel: Select, (k, v): &(Tensor, Tensor)) -> Result<(Tensor, Tensor)> {
    Ok((sel(k, TensorKind::Key)?, sel(v, TensorKind::Value)?))
}

/// A store whose content is the keys and values it holds (and state that stays
/// with them, such as a ring's head): selected rows and a file's `key` and `value` come
/// back through [`Refill::refill`].
pub(super) trait Refill: KvStore {
    /// Hold `k, v` (raw, as [`KvStore::held`] gives them) instead of what is held;
    /// `op` names the operation in errors.
    fn refill(&mut self, k: Tensor, v: Tensor, site: Site, op: &str) -> Result<()>;
}

/// [`KvStore::select_rows`] of a [`Refill`] store.
pub(super) fn select_refill(store: &mut impl Refill, sel: Select, site: Site) -> Result<()> {
    if let Some(held) = store.held() {
        let (k, v) = select_pair(sel, &held)?;
        store.refill(k, v, site, "reorder: rebuild")?;
    }
    Ok(())
}

/// [`KvStore::load`] of a [`Refill`] store: its `{name}key` and `{name}value`.
pub(super) fn load_refill(store: &mut impl Refill, from: &mut LayerFile) -> Result<()> {
    let (k, v) = from.key_value()?;
    store.refill(k, v, from.site, "load")
}

/// `none`: nothing is stored; the layer keeps the prefix (in the autograd graph, for
/// training) and every pass reads it and the pass's own keys and values.
#[derive(Debug, Clone)]
pub(super) struct Recompute;

impl KvStore for Recompute {
    fn held(&self) -> Option<(Tensor, Tensor)> {
        None
    }

    fn append(&mut self, step: &Step) -> Result<(Tensor, Tensor)> {
        step.after(step.prefix)
    }

    fn select_rows(&mut self, _: Select, _: Site) -> Result<()> {
        Ok(())
    }

    /// Holds nothing: what a file holds for the layer is its prefix, which the layer
    /// keeps ([`KvStore::keeps_positions`]).
    fn load(&mut self, _: &mut LayerFile) -> Result<()> {
        Ok(())
    }

    fn keeps_positions(&self) -> bool {
        false
    }
}

/// `dynamic` (and `hybrid`'s global layers without `max_len`): append by
/// concatenation, candle-nn's `ConcatKvCache` along dimension 2.
#[derive(Debug, Clone)]
pub(super) struct Dynamic(ConcatKvCache);

impl Default for Dynamic {
    fn default() -> Self {
        Self(ConcatKvCache::new(2))
    }
}

impl Dynamic {
    /// A store holding `k, v: [B, KVH, K, D]`.
    pub fn holding(k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        let mut store = Self::default();
        store.0.append(k, v)?;
        Ok(store)
    }
}

impl KvStore for Dynamic {
    fn held(&self) -> Option<(Tensor, Tensor)> {
        self.0.k().cloned().zip(self.0.v().cloned())
    }

    fn append(&mut self, step: &Step) -> Result<(Tensor, Tensor)> {
        if let Some((pk, pv)) = step.prefix {
            self.0.append(pk, pv).at(step.site_k, "store prefix")?;
        }
        self.0.append(step.k, step.v).at(step.site_k, "append keys")
    }

    fn select_rows(&mut self, sel: Select, site: Site) -> Result<()> {
        select_refill(self, sel, site)
    }

    fn load(&mut self, from: &mut LayerFile) -> Result<()> {
        load_refill(self, from)
    }
}

impl Refill for Dynamic {
    fn refill(&mut self, k: Tensor, v: Tensor, site: Site, op: &str) -> Result<()> {
        *self = Self::holding(&k, &v).at(site, &format!("{op} dynamic cache"))?;
        Ok(())
    }
}

/// `static` (and `hybrid`'s global layers with `max_len`): preallocated to a capacity,
/// written in place (candle-nn's `KvCache`, whose `slice_set` reads contiguous input
/// only).
#[derive(Debug, Clone)]
pub(super) struct Static {
    cache: KvCache,
    what: &'static str,
    hint: &'static str,
}

impl Static {
    fn new(max_len: usize, what: &'static str, hint: &'static str) -> Self {
        Self {
            cache: KvCache::new(2, max_len),
            what,
            hint,
        }
    }
}

impl Refill for Static {
    /// The same capacity, `k, v: [B, KVH, K, D]` written into a fresh buffer.
    fn refill(&mut self, k: Tensor, v: Tensor, site: Site, op: &str) -> Result<()> {
        let (k, v) = (k.contiguous(), v.contiguous());
        let (k, v) = (k.at(site, "keys")?, v.at(site, "values")?);
        let mut fresh = Self::new(self.cache.k_cache().max_seq_len(), self.what, self.hint);
        let op = format!("{op} static cache");
        fresh.cache.append(&k, &v).at(site, &op)?;
        *self = fresh;
        Ok(())
    }
}

impl KvStore for Static {
    fn held(&self) -> Option<(Tensor, Tensor)> {
        let (k, v) = (self.cache.k(), self.cache.v());
        k.ok().flatten().zip(v.ok().flatten())
    }

    fn append(&mut self, step: &Step) -> Result<(Tensor, Tensor)> {
        let (site_k, site_v) = (step.site_k, step.site_v);
        if let Some((pk, pv)) = step.prefix {
            let (pk, pv) = (pk.contiguous(), pv.contiguous());
            self.cache
                .append(&pk.at(site_k, "prefix")?, &pv.at(site_v, "prefix")?)
                .at(site_k, "store prefix")?;
        }
        let (kc, vc) = (step.k.contiguous(), step.v.contiguous());
        self.cache
            .append(&kc.at(site_k, "keys")?, &vc.at(site_v, "values")?)
            .at(site_k, "append keys")
    }

    fn select_rows(&mut self, sel: Select, site: Site) -> Result<()> {
        select_refill(self, sel, site)
    }

    fn load(&mut self, from: &mut LayerFile) -> Result<()> {
        load_refill(self, from)
    }

    fn capacity(&self) -> Option<Capacity> {
        Some(Capacity {
            positions: self.cache.k_cache().max_seq_len(),
            what: self.what,
            hint: self.hint,
        })
    }
}

/// `sliding` (and `hybrid`'s layers with a window) and `legacy`: keys and values as
/// two tensors in time order, the last [`Step::keep`] positions (`sliding`) or all of
/// them as-is in the family's legacy layout (`legacy`, appended along the layout's
/// sequence dimension).
#[derive(Debug, Clone)]
pub(super) struct Kept {
    /// `[B, KVH, L, D]`; `legacy`: bloom-legacy `[B*KVH, D, K]`, bigcode-fused
    /// `[B, K, 2D]`, else `[B, KVH, K, D]`
    k: Option<Tensor>,
    /// `[B, KVH, L, D]`; `legacy`: bloom-legacy `[B*KVH, K, D]`, bigcode-fused
    /// `[B, K, 2D]`, else `[B, KVH, K, D]`
    v: Option<Tensor>,
    /// Keeps the last [`Step::keep`] positions only (`sliding`).
    window: bool,
}

impl Kept {
    pub fn sliding() -> Self {
        Self {
            k: None,
            v: None,
            window: true,
        }
    }

    pub fn legacy() -> Self {
        Self {
            window: false,
            ..Self::sliding()
        }
    }
}

impl KvStore for Kept {
    fn held(&self) -> Option<(Tensor, Tensor)> {
        self.k.clone().zip(self.v.clone())
    }

    fn append(&mut self, step: &Step) -> Result<(Tensor, Tensor)> {
        let before = step.before(|| Ok(self.held()))?;
        // [B, KVH, L + S, D]
        let (rk, rv) = step.after(before.as_ref())?;
        if !self.window {
            self.k = Some(rk.detach());
            self.v = Some(rv.detach());
            return Ok((rk, rv));
        }
        let total = rk.dim(2).at(step.site_k, "key length")?;
        let keep = total.min(step.keep);
        let last = |t: &Tensor, site: Site| -> Result<Tensor> {
            Ok(t.narrow(2, total - keep, keep).at(site, "evict")?.detach())
        };
        self.k = Some(last(&rk, step.site_k)?);
        self.v = Some(last(&rv, step.site_v)?);
        Ok((rk, rv))
    }

    fn select_rows(&mut self, sel: Select, site: Site) -> Result<()> {
        select_refill(self, sel, site)
    }

    fn load(&mut self, from: &mut LayerFile) -> Result<()> {
        load_refill(self, from)
    }

    fn evicts(&self) -> bool {
        self.window
    }
}

impl Refill for Kept {
    fn refill(&mut self, k: Tensor, v: Tensor, _: Site, _: &str) -> Result<()> {
        (self.k, self.v) = (Some(k), Some(v));
        Ok(())
    }
}
