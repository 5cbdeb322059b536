//! The write path of [`ModelCache`]: self-attention keys and values in the standard
//! layout are converted to the store's layout, checked against what it holds,
//! stored and traced ([`ModelCache::update_self`]); cross-attention keys and values
//! are computed once and joined after the cross prefix ([`ModelCache::cross`]).

use candle_core::Tensor;

use super::check::{check_append, check_capacity, check_window, no_layer};
use super::stores::Step;
use super::{
    hybrid, shape, shapes, CacheConfig, CacheMode, KvView, LayerCache, Layout, ModelCache,
};

use crate::engine::diagnosis::{Attention, CandleExt, Result, Site, TensorKind};
use crate::engine::trace::{event, CacheOp};

impl ModelCache {
    /// Append this step's self-attention keys/values `[B, KVH, S, D]` for the query
    /// positions `positions` and return what the attention may read: convert them to
    /// the stored layout, check them against what the layer holds, store them, trace.
    pub fn update_self(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        positions: (usize, usize),
    ) -> Result<KvView> {
        let layout = self.layout;
        let att = Attention::SelfAttn;
        let site_k = Site::new(layer, att, TensorKind::Key);
        let (_, kv_heads, s_new, _) = k.dims4().at(site_k, "new keys")?;
        self.kv_heads = Some(kv_heads);
        let mut e = event(layer, att, CacheOp::Update, layout);
        e.positions = Some(positions);
        e.store = self.store_name(layer, att);
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| no_layer(layer, att))?;

        // Convert: the stored layout, e.g. [B*KVH, D, S] keys for bloom-legacy.
        let (k_new, v_new) = layout
            .from_standard(k, v)
            .at(site_k, "convert to cache layout")?;
        e.shapes.key_written = Some(shape(&k_new));
        e.shapes.value_written = Some(shape(&v_new));

        // Check against what the layer holds, raw (the prefix first).
        let held = l.held();
        (e.shapes.key_before, e.shapes.value_before) = shapes(held.as_ref());
        if let Some((hk, hv)) = &held {
            let p = l.prefix_len;
            check_append(layout, layer, att, TensorKind::Key, hk, &k_new, p)?;
            check_append(layout, layer, att, TensorKind::Value, hv, &v_new, p)?;
        }
        if let Some(capacity) = l.store.capacity() {
            check_capacity(&capacity, layer, k, l.seen, s_new, l.prefix_len)?;
        }

        // Store: [B, KVH, L + S, D] in the stored layout.
        let (read_k, read_v, kv_start) =
            l.store_step(&self.config, layout, layer, &k_new, &v_new, s_new)?;

        // Trace.
        (e.shapes.key_after, e.shapes.value_after) = shapes(l.store.held().as_ref());
        e.ring_head = l.store.ring_head();
        let (k4, v4) = layout
            .to_standard(&read_k, &read_v, kv_heads)
            .at(site_k, "convert from cache layout")?;
        e.key_read = Some(shape(&k4));
        e.value_read = Some(shape(&v4));
        self.trace.push(e);
        Ok(KvView {
            k: k4,
            v: v4,
            kv_start,
        })
    }

    /// Cross-attention keys/values of `layer` `[B, KVH, P+E, D]`: computed from the
    /// encoder output by `compute` (returning `[B, KVH, E, D]`) the first time, joined
    /// after the cross prefix, and read from the cache afterwards, following
    /// `EncoderDecoderCache.is_updated`. With `none`, recomputed every pass.
    pub fn cross(
        &mut self,
        layer: usize,
        compute: impl FnOnce() -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let att = Attention::Cross;
        let recompute = matches!(self.config.mode, CacheMode::None);
        let c = self
            .cross
            .get_mut(layer)
            .ok_or_else(|| no_layer(layer, att))?;
        if let (true, false, Some((k, v))) = (c.is_updated, recompute, c.kv.clone()) {
            let mut e = event(layer, att, CacheOp::Read, Layout::Standard);
            e.shapes.key_before = Some(shape(&k));
            e.shapes.value_before = Some(shape(&v));
            e.shapes.key_after = Some(shape(&k));
            e.shapes.value_after = Some(shape(&v));
            e.key_read = Some(shape(&k));
            e.value_read = Some(shape(&v));
            self.trace.push(e);
            return Ok((k, v));
        }
        let (k, v) = compute()?;
        let site_k = Site::new(layer, att, TensorKind::Key);
        let site_v = Site::new(layer, att, TensorKind::Value);
        let mut e = event(layer, att, CacheOp::Update, Layout::Standard);
        e.shapes.key_written = Some(shape(&k));
        e.shapes.value_written = Some(shape(&v));
        let (k, v) = match &c.prefix {
            Some((pk, pv)) => {
                e.shapes.key_before = Some(shape(pk));
                e.shapes.value_before = Some(shape(pv));
                let p = c.prefix_len;
                check_append(Layout::Standard, layer, att, TensorKind::Key, pk, &k, p)?;
                check_append(Layout::Standard, layer, att, TensorKind::Value, pv, &v, p)?;
                (
                    Tensor::cat(&[pk, &k], 2).at(site_k, "append cross keys")?,
                    Tensor::cat(&[pv, &v], 2).at(site_v, "append cross values")?,
                )
            }
            None => (k, v),
        };
        if !recompute {
            c.kv = Some((k.detach(), v.detach()));
            c.is_updated = true;
        }
        e.shapes.key_after = Some(shape(&k));
        e.shapes.value_after = Some(shape(&v));
        e.key_read = Some(shape(&k));
        e.value_read = Some(shape(&v));
        self.trace.push(e);
        Ok((k, v))
    }
}

impl LayerCache {
    /// Store the `s_new` positions `k, v` (the stored layout, e.g. `[B, KVH, S, D]`),
    /// after the prefix when it joins the store now; returns what the attention reads,
    /// in the stored layout (e.g. `([B, KVH, L + S, D], [B, KVH, L + S, D])`), and the
    /// absolute position of its first key.
    fn store_step(
        &mut self,
        config: &CacheConfig,
        layout: Layout,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        s_new: usize,
    ) -> Result<(Tensor, Tensor, usize)> {
        let prefix = self.prefix.take();
        let site_k = Site::new(layer, Attention::SelfAttn, TensorKind::Key);
        let step = Step {
            layout,
            prefix: prefix.as_ref(),
            k,
            v,
            keep: match self.window {
                Some(w) => hybrid::keep(w),
                None => config.window.unwrap_or(usize::MAX),
            },
            site_k,
            site_v: Site::new(layer, Attention::SelfAttn, TensorKind::Value),
        };
        let appended = self.store.append(&step);
        if !self.store.keeps_positions() {
            // Nothing is stored: the prefix stays (in the graph) for the next pass.
            self.prefix = prefix;
        }
        let (rk, rv) = appended?;
        // The attention reads everything it was given this step (its mask limits each
        // query to the window); a window store keeps the last `keep`.
        let kv_start = match self.store.evicts() {
            true => {
                let total = rk.dim(2).at(site_k, "key length")?;
                check_window(
                    config.mode,
                    layer,
                    self.seen + s_new,
                    total,
                    self.prefix_len,
                )?
            }
            false => 0,
        };
        if self.store.keeps_positions() {
            self.seen += s_new;
        }
        Ok((rk, rv, kv_start))
    }
}
