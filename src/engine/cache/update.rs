//! The write path of [`ModelCache`]: self-attention keys and values in the standard
//! layout are converted to the store's layout, checked against what it holds,
//! stored and traced ([`ModelCache::update_self`]); cross-attention keys and values
//! are computed once and joined after the cross prefix ([`ModelCache::cross`]).

use candle_core::Tensor;

use super::check::{check_append, no_layer};
use super::{hybrid, shape, CacheMode, KvView, Layout, ModelCache, Store};

use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, Result, Site, TensorKind,
};
use crate::engine::trace::{event, CacheOp};

impl ModelCache {
    /// Append this step's self-attention keys/values `[B, KVH, S, D]` for the query
    /// positions `positions` and return what the attention may read.
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
        let (k_new, v_new) = layout
            .from_standard(k, v)
            .at(site_k, "convert to cache layout")?;
        e.key_written = Some(shape(&k_new));
        e.value_written = Some(shape(&v_new));

        // What the cache already holds, in its raw form, for checking.
        let held = l.held();
        if let Some((hk, hv)) = &held {
            e.key_before = Some(shape(hk));
            e.value_before = Some(shape(hv));
            check_append(
                layout,
                layer,
                att,
                TensorKind::Key,
                hk,
                &k_new,
                l.prefix_len,
            )?;
            check_append(
                layout,
                layer,
                att,
                TensorKind::Value,
                hv,
                &v_new,
                l.prefix_len,
            )?;
        }
        let capacity = match self.config.mode {
            CacheMode::Static { max_len } => Some(max_len),
            CacheMode::Hybrid { max_len } if l.window.is_none() => max_len,
            _ => None,
        };
        if let Some(max_len) = capacity {
            let need = l.seen + s_new;
            if need > max_len {
                let mut exp = shape(k);
                exp[2] = need;
                let mut act = shape(k);
                act[2] = max_len;
                let (what, hint) = match self.config.mode {
                    CacheMode::Hybrid { .. } => ("the hybrid cache's global layer", hybrid::CAPACITY_HINT),
                    _ => ("static cache", "the static cache was sized for the prompt and new tokens without the P virtual tokens (max_len must be >= P + prompt + max_new_tokens)"),
                };
                return Err(Diagnosis::new(
                    DiagnosisClass::SeqLen,
                    format!(
                        "{what} holds {max_len} positions but prefix ({}) + tokens so far + {s_new} new need {need}",
                        l.prefix_len
                    ),
                )
                .at(layer, att, TensorKind::Key)
                .shapes(&exp, &act)
                .hint(hint)
                .into());
            }
        }

        let prefix = l.prefix.take();
        let site_v = Site::new(layer, att, TensorKind::Value);
        let (read_k, read_v, kv_start) = match &mut l.store {
            Store::Recompute => {
                // Nothing is stored: the prefix stays (in the graph) for the next pass.
                l.prefix = prefix.clone();
                let (rk, rv) = match &prefix {
                    Some((pk, pv)) => (
                        layout
                            .cat(pk, &k_new, TensorKind::Key)
                            .at(site_k, "append keys")?,
                        layout
                            .cat(pv, &v_new, TensorKind::Value)
                            .at(site_v, "append values")?,
                    ),
                    None => (k_new.clone(), v_new.clone()),
                };
                (rk, rv, 0)
            }
            Store::Dynamic(c) => {
                if let Some((pk, pv)) = &prefix {
                    c.append(pk, pv).at(site_k, "store prefix")?;
                }
                let (rk, rv) = c.append(&k_new, &v_new).at(site_k, "append keys")?;
                (rk, rv, 0)
            }
            Store::Static(c) => {
                // candle's KvCache writes with `slice_set`, which needs contiguous input.
                if let Some((pk, pv)) = &prefix {
                    let (pk, pv) = (pk.contiguous(), pv.contiguous());
                    c.append(&pk.at(site_k, "prefix")?, &pv.at(site_v, "prefix")?)
                        .at(site_k, "store prefix")?;
                }
                let (kc, vc) = (k_new.contiguous(), v_new.contiguous());
                let (rk, rv) = c
                    .append(&kc.at(site_k, "keys")?, &vc.at(site_v, "values")?)
                    .at(site_k, "append keys")?;
                (rk, rv, 0)
            }
            Store::Legacy { k: sk, v: sv } => {
                let base = prefix.clone().or_else(|| sk.clone().zip(sv.clone()));
                let (rk, rv) = match base {
                    Some((bk, bv)) => (
                        layout
                            .cat(&bk, &k_new, TensorKind::Key)
                            .at(site_k, "append keys")?,
                        layout
                            .cat(&bv, &v_new, TensorKind::Value)
                            .at(site_v, "append values")?,
                    ),
                    None => (k_new.clone(), v_new.clone()),
                };
                *sk = Some(rk.detach());
                *sv = Some(rv.detach());
                (rk, rv, 0)
            }
            Store::Quantized(q) => {
                // The prefix joins the store first: pinned exact, or quantized like
                // any other position once it is older than the last R.
                if let Some((pk, pv)) = &prefix {
                    q.seed(pk, pv).at(site_k, "store prefix")?;
                }
                // What the cache held, dequantized, then this step's own keys and
                // values exact: [B, KVH, L + S, D]
                let (rk, rv) = match q.view() {
                    Some((hk, hv)) => (
                        Tensor::cat(&[hk, &k_new], 2).at(site_k, "append keys")?,
                        Tensor::cat(&[hv, &v_new], 2).at(site_v, "append values")?,
                    ),
                    None => (k_new.clone(), v_new.clone()),
                };
                q.append(&k_new, &v_new).at(site_k, "quantize")?;
                (rk, rv, 0)
            }
            Store::Sliding { .. } | Store::Rotating(_) => {
                let window = match l.window {
                    Some(w) => hybrid::keep(w),
                    None => self.config.window.unwrap_or(usize::MAX),
                };
                // [B, KVH, L, D] each, in time order (a ring is unrolled)
                let base = match (&prefix, &l.store) {
                    (Some(p), _) => Some(p.clone()),
                    (None, Store::Sliding { k, v }) => k.clone().zip(v.clone()),
                    (None, Store::Rotating(r)) => r.unrolled().at(site_k, "unroll ring")?,
                    _ => None,
                };
                // [B, KVH, L + S, D]
                let (rk, rv) = match base {
                    Some((bk, bv)) => (
                        Tensor::cat(&[&bk, &k_new], 2).at(site_k, "append keys")?,
                        Tensor::cat(&[&bv, &v_new], 2).at(site_v, "append values")?,
                    ),
                    None => (k_new.clone(), v_new.clone()),
                };
                // The attention reads everything it was given this step (its mask
                // limits each query to the window); the cache keeps the last W.
                let total = rk.dim(2).at(site_k, "key length")?;
                match &mut l.store {
                    Store::Rotating(r) => {
                        r.store(&rk, &rv, &k_new, &v_new, window)
                            .at(site_k, "write ring")?;
                        e.ring_head = Some(r.head);
                    }
                    Store::Sliding { k: sk, v: sv } => {
                        let keep = total.min(window);
                        *sk = Some(
                            rk.narrow(2, total - keep, keep)
                                .at(site_k, "evict")?
                                .detach(),
                        );
                        *sv = Some(
                            rv.narrow(2, total - keep, keep)
                                .at(site_v, "evict")?
                                .detach(),
                        );
                    }
                    _ => {}
                }
                // The held keys end at position `seen`; more keys than positions means
                // the prefix's length disagrees with what was seeded.
                let Some(kv_start) = (l.seen + s_new).checked_sub(total) else {
                    return Err(Diagnosis::new(
                        DiagnosisClass::SeqLen,
                        format!(
                            "the {} cache holds {total} keys for only {} positions (prefix {} + tokens)",
                            self.config.mode.name(),
                            l.seen + s_new,
                            l.prefix_len
                        ),
                    )
                    .at(layer, att, TensorKind::Key)
                    .shapes(&[l.seen + s_new], &[total])
                    .hint("the prefix has more positions than the P it was seeded with")
                    .into());
                };
                (rk, rv, kv_start)
            }
        };
        if !matches!(l.store, Store::Recompute) {
            l.seen += s_new;
        }
        let (after_k, after_v) = match &l.store {
            Store::Recompute => (None, None),
            Store::Dynamic(c) => (c.k().map(shape), c.v().map(shape)),
            Store::Static(c) => (
                c.k().ok().flatten().map(|t| shape(&t)),
                c.v().ok().flatten().map(|t| shape(&t)),
            ),
            Store::Sliding { k, v } | Store::Legacy { k, v } => {
                (k.as_ref().map(shape), v.as_ref().map(shape))
            }
            Store::Rotating(r) => (r.k.as_ref().map(shape), r.v.as_ref().map(shape)),
            Store::Quantized(q) => (
                q.view().map(|(k, _)| shape(k)),
                q.view().map(|(_, v)| shape(v)),
            ),
        };
        e.key_after = after_k;
        e.value_after = after_v;
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
            e.key_before = Some(shape(&k));
            e.value_before = Some(shape(&v));
            e.key_after = Some(shape(&k));
            e.value_after = Some(shape(&v));
            e.key_read = Some(shape(&k));
            e.value_read = Some(shape(&v));
            self.trace.push(e);
            return Ok((k, v));
        }
        let (k, v) = compute()?;
        let site_k = Site::new(layer, att, TensorKind::Key);
        let site_v = Site::new(layer, att, TensorKind::Value);
        let mut e = event(layer, att, CacheOp::Update, Layout::Standard);
        e.key_written = Some(shape(&k));
        e.value_written = Some(shape(&v));
        let (k, v) = match &c.prefix {
            Some((pk, pv)) => {
                e.key_before = Some(shape(pk));
                e.value_before = Some(shape(pv));
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
        e.key_after = Some(shape(&k));
        e.value_after = Some(shape(&v));
        e.key_read = Some(shape(&k));
        e.value_read = Some(shape(&v));
        self.trace.push(e);
        Ok((k, v))
    }
}
