//! The `quantized` store: the last R positions of a layer in full precision, the older
//! ones as `bits`-bit integer codes (transformers' `QuantizedCache`, after KIVI).
//!
//! One layer holds, in time order (standard layout, keys and values alike):
//!
//! ```text
//! [ pinned P (exact) ][ quantized Q (u8 codes) ][ recent T <= R (exact) ]
//! ```
//!
//! `pinned` is the prefix, kept exact for good with `prefix_full_precision`; otherwise
//! the prefix is an ordinary run of positions and is quantized like the others once
//! it falls out of the last R. After every append exactly the last `min(R, n)` of the
//! `n` unpinned positions are exact.
//!
//! Quantization is per channel: every (batch row, KV head, `head_dim` index) of the
//! quantized part has one scale and one zero point over its Q positions, from their
//! minimum and maximum (asymmetric):
//!
//! ```text
//! scale = (max - min) / (2^bits - 1)        (1 for a flat channel, max == min)
//! zero  = min                               (the value code 0 stands for)
//! code  = clamp(round((x - zero) / scale), 0, 2^bits - 1)      stored as u8
//! x'    = code * scale + zero
//! ```
//!
//! so `|x - x'| <= scale / 2` (plus f32 rounding). When positions leave the exact
//! window they join the quantized part, which is quantized again from its
//! dequantized values and the new ones, as transformers does when it flushes its
//! residual: a channel whose minimum and maximum stay put keeps its codes; one whose
//! range grows is rounded again on the new, coarser grid.
//!
//! The attention of a step reads what the cache held before the step (dequantized)
//! and the step's own keys and values exact, as transformers' `QuantizedLayer.update`
//! returns them; they are quantized afterwards, once they leave the window.
//!
//! Where this differs from transformers' `QuantizedLayer` (deliberately, so that the
//! exact window is the same at every step): transformers quantizes everything its first
//! update receives and lets its full-precision part grow to `residual_length`, then
//! quantizes all of it at once and empties it; here the window slides by one position
//! per decoding step. transformers also groups channels (`q_group_size`) and hands the
//! arithmetic to a backend (optimum-quanto, HQQ); here every channel is its own group.

use candle_core::{DType, Result, Tensor};

use super::file::{positions, LayerFile, SavedLayer, SavedQuantLayer};
use super::stores::{push_pair, KvStore, Select, Step};
use crate::engine::diagnosis::{CandleExt, Site, TensorKind};

/// Bits per code when a scenario gives none.
pub const DEFAULT_BITS: u8 = 8;
/// Positions kept in full precision when a scenario gives none. transformers defaults
/// to `residual_length=128`, which would leave the tiny scenarios' 10 to 60 positions
/// all exact; 4 quantizes most of them while the last few stay exact.
pub const DEFAULT_RESIDUAL: usize = 4;

/// The largest code, `2^bits - 1`; codes are u8, so 1 to 8 bits.
pub fn levels(bits: u8) -> Result<f64> {
    if !(1..=8).contains(&bits) {
        candle_core::bail!("quantized cache: {bits} bits; the codes are u8, so 1 to 8 bits");
    }
    Ok(((1u32 << bits) - 1) as f64)
}

/// One quantized tensor: codes and per-channel scale and zero point.
#[derive(Debug, Clone)]
pub struct Codes {
    /// `[B, KVH, Q, D]` u8, each in `0..=2^bits - 1`.
    pub codes: Tensor,
    /// `[B, KVH, 1, D]` f32: the step between two codes.
    pub scale: Tensor,
    /// `[B, KVH, 1, D]` f32: the value of code 0 (the channel's minimum).
    pub zero: Tensor,
}

impl Codes {
    /// Positions held, Q.
    pub fn len(&self) -> usize {
        self.codes.dim(2).unwrap_or(0)
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same rows, each tensor passed through `f` (codes `[B, KVH, Q, D]`, scale
    /// and zero `[B, KVH, 1, D]`).
    fn try_map<E>(
        &self,
        f: &mut impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Codes, E> {
        Ok(Codes {
            codes: f(&self.codes)?,
            scale: f(&self.scale)?,
            zero: f(&self.zero)?,
        })
    }
}

/// Quantize `x: [B, KVH, Q, D]` (any float dtype, `Q >= 1`) per channel `(b, h, d)`
/// over its Q positions, with `bits` bits.
pub fn quantize(x: &Tensor, bits: u8) -> Result<Codes> {
    let levels = levels(bits)?;
    let x = x.to_dtype(DType::F32)?;
    // [B, KVH, 1, D]
    let zero = x.min_keepdim(2)?;
    let range = (x.max_keepdim(2)? - &zero)?;
    // A flat channel gets scale 1: all its codes are 0, which is exact.
    let flat = range.eq(0f64)?.to_dtype(DType::F32)?;
    let scale = ((range / levels)? + flat)?;
    // [B, KVH, Q, D]
    let codes = x
        .broadcast_sub(&zero)?
        .broadcast_div(&scale)?
        .round()?
        .clamp(0f64, levels)?
        .to_dtype(DType::U8)?;
    Ok(Codes { codes, scale, zero })
}

/// `[B, KVH, Q, D]` f32: the values the codes stand for.
pub fn dequantize(c: &Codes) -> Result<Tensor> {
    c.codes
        .to_dtype(DType::F32)?
        .broadcast_mul(&c.scale)?
        .broadcast_add(&c.zero)
}

/// One layer's quantized store.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub bits: u8,
    /// R, the positions kept exact at the end.
    pub residual: usize,
    /// Keep the prefix exact for good (`pinned`).
    pub prefix_full_precision: bool,
    /// The prefix, exact (`prefix_full_precision`): keys and values `[B, KVH, P, D]`.
    pub pinned: Option<(Tensor, Tensor)>,
    /// The positions before the exact window: keys and values, `[B, KVH, Q, D]` each.
    pub quantized: Option<(Codes, Codes)>,
    /// The last `T <= R` positions, exact: keys and values `[B, KVH, T, D]`.
    pub recent: Option<(Tensor, Tensor)>,
    /// The dtype of the keys and values written (the codes dequantize to it).
    pub dtype: Option<DType>,
    /// Everything held in time order, dequantized: keys and values
    /// `[B, KVH, P + Q + T, D]` in `dtype`. Rebuilt after every change.
    view: Option<(Tensor, Tensor)>,
}

impl Quantized {
    pub fn new(bits: u8, residual: usize, prefix_full_precision: bool) -> Self {
        Self {
            bits,
            residual,
            prefix_full_precision,
            pinned: None,
            quantized: None,
            recent: None,
            dtype: None,
            view: None,
        }
    }

    /// A store filled with saved parts (see [`Quantized`]'s fields for the shapes).
    pub fn restored(
        mut self,
        pinned: Option<(Tensor, Tensor)>,
        quantized: Option<(Codes, Codes)>,
        recent: Option<(Tensor, Tensor)>,
        dtype: DType,
    ) -> Result<Self> {
        self.pinned = pinned;
        self.quantized = quantized;
        self.recent = recent;
        self.dtype = Some(dtype);
        self.rebuild()?;
        Ok(self)
    }

    /// What the store holds in time order, dequantized: keys and values
    /// `([B, KVH, P + Q + T, D], [B, KVH, P + Q + T, D])`; None when empty.
    pub fn view(&self) -> Option<&(Tensor, Tensor)> {
        self.view.as_ref()
    }

    /// Positions held, `P + Q + T`.
    pub fn len(&self) -> usize {
        self.view
            .as_ref()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions held as codes, Q.
    pub fn quantized_len(&self) -> usize {
        self.quantized.as_ref().map_or(0, |(k, _)| k.len())
    }

    /// Place the prefix `k, v: [B, KVH, P, D]`: pinned exact with
    /// `prefix_full_precision`, else appended like any other positions.
    pub fn seed(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        if !self.prefix_full_precision {
            return self.append(k, v);
        }
        self.dtype = Some(k.dtype());
        self.pinned = Some(match self.pinned.take() {
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, &k.detach()], 2)?,
                Tensor::cat(&[&pv, &v.detach()], 2)?,
            ),
            None => (k.detach(), v.detach()),
        });
        self.rebuild()
    }

    /// Append `k, v: [B, KVH, S, D]`; the positions that leave the last R join the
    /// quantized part, which is quantized again.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        self.dtype = Some(k.dtype());
        // [B, KVH, T + S, D]
        let (rk, rv) = match self.recent.take() {
            Some((rk, rv)) => (
                Tensor::cat(&[&rk, &k.detach()], 2)?,
                Tensor::cat(&[&rv, &v.detach()], 2)?,
            ),
            None => (k.detach(), v.detach()),
        };
        let total = rk.dim(2)?;
        let keep = total.min(self.residual);
        let leave = total - keep;
        if leave > 0 {
            // [B, KVH, Q + leave, D]
            let join = |old: Option<&Codes>, new: Tensor| -> Result<Tensor> {
                match old {
                    Some(c) => Tensor::cat(&[&dequantize(c)?, &new.to_dtype(DType::F32)?], 2),
                    None => Ok(new),
                }
            };
            let old = self.quantized.take();
            let qk = join(old.as_ref().map(|(k, _)| k), rk.narrow(2, 0, leave)?)?;
            let qv = join(old.as_ref().map(|(_, v)| v), rv.narrow(2, 0, leave)?)?;
            self.quantized = Some((quantize(&qk, self.bits)?, quantize(&qv, self.bits)?));
        }
        self.recent = if keep > 0 {
            Some((rk.narrow(2, leave, keep)?, rv.narrow(2, leave, keep)?))
        } else {
            None
        };
        self.rebuild()
    }

    /// Pass every tensor held through `f` (a selection of batch rows along dimension
    /// 0: `[N, ...]` -> `[N', ...]`), keys with [`TensorKind::Key`], values with
    /// [`TensorKind::Value`]; `site` names the layer in errors.
    pub fn try_map_rows(
        &mut self,
        mut f: impl FnMut(&Tensor, TensorKind) -> crate::engine::diagnosis::Result<Tensor>,
        site: Site,
    ) -> crate::engine::diagnosis::Result<()> {
        let (key, value) = (TensorKind::Key, TensorKind::Value);
        if let Some((k, v)) = &self.pinned {
            self.pinned = Some((f(k, key)?, f(v, value)?));
        }
        if let Some((k, v)) = &self.quantized {
            self.quantized = Some((
                k.try_map(&mut |t| f(t, key))?,
                v.try_map(&mut |t| f(t, value))?,
            ));
        }
        if let Some((k, v)) = &self.recent {
            self.recent = Some((f(k, key)?, f(v, value)?));
        }
        self.rebuild().at(site, "dequantize the selected rows")
    }

    /// Recompute the time-ordered view from the parts.
    fn rebuild(&mut self) -> Result<()> {
        let dtype = self.dtype.unwrap_or(DType::F32);
        let mut ks = vec![];
        let mut vs = vec![];
        if let Some((k, v)) = &self.pinned {
            ks.push(k.clone());
            vs.push(v.clone());
        }
        if let Some((k, v)) = &self.quantized {
            ks.push(dequantize(k)?.to_dtype(dtype)?);
            vs.push(dequantize(v)?.to_dtype(dtype)?);
        }
        if let Some((k, v)) = &self.recent {
            ks.push(k.clone());
            vs.push(v.clone());
        }
        self.view = match ks.len() {
            0 => None,
            1 => Some((ks.remove(0), vs.remove(0))),
            _ => Some((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)),
        };
        Ok(())
    }
}

impl KvStore for Quantized {
    /// The dequantized view, in time order.
    fn held(&self) -> Option<(Tensor, Tensor)> {
        self.view().cloned()
    }

    /// The prefix joins the store first: pinned exact, or quantized like any other
    /// position once it is older than the last R. The attention reads what the store
    /// held, dequantized, then this step's own keys and values exact.
    fn append(&mut self, step: &Step) -> crate::engine::diagnosis::Result<(Tensor, Tensor)> {
        if let Some((pk, pv)) = step.prefix {
            self.seed(pk, pv).at(step.site_k, "store prefix")?;
        }
        // [B, KVH, L + S, D]
        let read = step.after(self.view())?;
        Quantized::append(self, step.k, step.v).at(step.site_k, "quantize")?;
        Ok(read)
    }

    /// Codes, scales, zero points and exact parts: each row's channels move with the
    /// row.
    fn select_rows(&mut self, sel: Select, site: Site) -> crate::engine::diagnosis::Result<()> {
        self.try_map_rows(sel, site)
    }

    /// Each part that holds positions (see `file/mod.rs` for the names), and P, Q and T
    /// in the layer's `quantized` entry.
    fn save(&self, name: &str, tensors: &mut Vec<(String, Tensor)>, layer: &mut SavedLayer) {
        if self.view.is_none() {
            return;
        }
        let mut pair = |part: &str, p: Option<&(Tensor, Tensor)>| {
            if let Some((k, v)) = p {
                push_pair(tensors, &format!("{name}{part}"), k.clone(), v.clone());
            }
            positions(p)
        };
        let pinned = pair("prefix_", self.pinned.as_ref());
        let recent = pair("", self.recent.as_ref());
        if let Some((k, v)) = &self.quantized {
            for (kind, c) in [("key", k), ("value", v)] {
                tensors.push((format!("{name}{kind}_codes"), c.codes.clone()));
                tensors.push((format!("{name}{kind}_scale"), c.scale.clone()));
                tensors.push((format!("{name}{kind}_zero"), c.zero.clone()));
            }
        }
        layer.quantized = Some(SavedQuantLayer {
            pinned,
            quantized: self.quantized_len(),
            recent,
        });
    }

    /// The parts the layer's `quantized` entry announces, in a store of these
    /// settings; a layer without that entry is refused.
    fn load(&mut self, from: &mut LayerFile) -> crate::engine::diagnosis::Result<()> {
        let (name, file, site) = (&from.name, &mut *from.file, from.site);
        let Some(parts) = from.state.quantized else {
            file.key_value(name)?;
            let why = format!(
                "its state has no `quantized` entry for layer {}",
                site.layer
            );
            return Err(file.bad(why));
        };
        let pinned = file.pair(&format!("{name}prefix_"), parts.pinned)?;
        let recent = file.pair(name, parts.recent)?;
        let quantized = if parts.quantized > 0 {
            Some((
                file.codes(&format!("{name}key_"), parts.quantized)?,
                file.codes(&format!("{name}value_"), parts.quantized)?,
            ))
        } else {
            None
        };
        *self = Quantized::new(self.bits, self.residual, self.prefix_full_precision)
            .restored(pinned, quantized, recent, file.dtype)
            .at(site, "load quantized cache")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `[B, KVH, n, D]` of smooth but irregular values, different per row, head and
    /// channel, starting at position `from`.
    fn kv(b: usize, h: usize, from: usize, n: usize, d: usize, seed: f32) -> Tensor {
        let mut v = Vec::with_capacity(b * h * n * d);
        for bi in 0..b {
            for hi in 0..h {
                for p in from..from + n {
                    for di in 0..d {
                        let x = (p as f32 * 0.37
                            + di as f32 * 1.3
                            + hi as f32 * 0.7
                            + bi as f32 * 2.1
                            + seed)
                            .sin()
                            * (1.0 + di as f32 * 0.5)
                            + 0.1 * (p as f32 * 1.7 + seed).cos();
                        v.push(x);
                    }
                }
            }
        }
        Tensor::from_vec(v, (b, h, n, d), &Device::Cpu).unwrap()
    }

    fn host(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `[B, KVH, 1, D]` -> one value per channel, repeated over `n` positions, in the
    /// order of `host` of a `[B, KVH, n, D]` tensor.
    fn per_channel(t: &Tensor, n: usize) -> Vec<f32> {
        let (b, h, one, d) = t.dims4().unwrap();
        assert_eq!(one, 1, "one scale per channel: {:?}", t.dims());
        let t = t.repeat((1, 1, n, 1)).unwrap();
        assert_eq!(t.dims(), &[b, h, n, d]);
        host(&t)
    }

    /// Every element of `x` within half a step of its channel (plus f32 rounding) of
    /// its round trip through `bits` bits.
    fn assert_round_trip_within_half_a_step(x: &Tensor, bits: u8) {
        let c = quantize(x, bits).unwrap();
        let back = dequantize(&c).unwrap();
        let n = x.dim(2).unwrap();
        let (xs, bs, steps) = (host(x), host(&back), per_channel(&c.scale, n));
        let mut worst = 0f32;
        for ((x, b), s) in xs.iter().zip(&bs).zip(&steps) {
            let err = (x - b).abs();
            assert!(
                err <= s / 2.0 * (1.0 + 1e-4) + 1e-6,
                "{bits} bits: {x} came back as {b}, error {err} over half a step {}",
                s / 2.0
            );
            worst = worst.max(err / s);
        }
        // The bound is tight: some element is rounded by close to half a step.
        assert!(worst > 0.3, "{bits} bits: largest error only {worst} steps");
        let codes: Vec<u8> = c.codes.flatten_all().unwrap().to_vec1().unwrap();
        let top = (1u32 << bits) - 1;
        assert!(codes.iter().all(|c| (*c as u32) <= top));
        assert!(
            codes.iter().any(|c| *c as u32 == top),
            "the maximum maps to the top code"
        );
        assert!(codes.contains(&0), "the minimum maps to code 0");
    }

    #[test]
    fn a_round_trip_errs_by_at_most_half_a_step_per_channel() {
        let x = kv(2, 3, 0, 17, 5, 0.3);
        assert_round_trip_within_half_a_step(&x, 8);
        assert_round_trip_within_half_a_step(&x, 4);
        // The step is the channel's range over 2^bits - 1: 16 times coarser at 4 bits.
        let (c8, c4) = (quantize(&x, 8).unwrap(), quantize(&x, 4).unwrap());
        for (s8, s4) in host(&c8.scale).iter().zip(host(&c4.scale)) {
            assert!((s4 / s8 - 255.0 / 15.0).abs() < 1e-3, "{s4} / {s8}");
        }
    }

    #[test]
    fn each_channel_has_its_own_scale_and_zero_point() {
        // Channel 0 spans 1000, channel 1 a thousandth, channel 2 sits far from 0: each
        // keeps its own precision (a scale per tensor would round channel 1 to one
        // value, one without a zero point would lose channel 2).
        let v: Vec<f32> = (0..9)
            .flat_map(|p| {
                let p = p as f32;
                [p * 125.0, p * 1.25e-4, 500.0 + p * 0.01]
            })
            .collect();
        let x = Tensor::from_vec(v, (1, 1, 9, 3), &Device::Cpu).unwrap();
        let c = quantize(&x, 8).unwrap();
        assert_eq!(c.scale.dims(), &[1, 1, 1, 3]);
        assert_eq!(c.zero.dims(), &[1, 1, 1, 3]);
        let back = host(&dequantize(&c).unwrap());
        for (i, (a, b)) in host(&x).iter().zip(&back).enumerate() {
            let range = [1000.0, 1e-3, 0.08][i % 3];
            let half = range / 255.0 / 2.0;
            assert!(
                (a - b).abs() <= half * 1.001 + 500.0 * f32::EPSILON,
                "channel {}: {a} came back as {b}",
                i % 3
            );
        }
    }

    #[test]
    fn a_flat_channel_comes_back_exact() {
        let x = Tensor::full(-0.75f32, (1, 2, 6, 3), &Device::Cpu).unwrap();
        let c = quantize(&x, 4).unwrap();
        assert_eq!(host(&dequantize(&c).unwrap()), host(&x));
        assert!(host(&c.scale).iter().all(|s| *s == 1.0));
    }

    #[test]
    fn bits_outside_one_to_eight_are_refused() {
        let x = kv(1, 1, 0, 3, 2, 0.0);
        assert!(quantize(&x, 0).is_err());
        assert!(quantize(&x, 9).is_err());
    }

    /// Append `steps` (position counts) of `kv(b, h, .., d)` to a store; returns it
    /// with everything appended, `[B, KVH, n, D]` keys and values.
    fn fill(
        store: &mut Quantized,
        b: usize,
        h: usize,
        d: usize,
        steps: &[usize],
    ) -> (Tensor, Tensor) {
        let mut from = 0;
        let (mut ks, mut vs) = (vec![], vec![]);
        for &s in steps {
            let (k, v) = (kv(b, h, from, s, d, 0.1), kv(b, h, from, s, d, 5.0));
            store.append(&k, &v).unwrap();
            ks.push(k);
            vs.push(v);
            from += s;
        }
        (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap())
    }

    #[test]
    fn the_last_r_positions_stay_exact_and_the_older_ones_are_quantized() {
        for (residual, steps) in [
            (4, vec![9, 1, 1, 1]),
            (1, vec![3, 1, 1]),
            (6, vec![2, 2, 1, 5, 1]),
        ] {
            let mut q = Quantized::new(8, residual, false);
            let (k, v) = fill(&mut q, 2, 2, 4, &steps);
            let n: usize = steps.iter().sum();
            let (vk, vv) = q.view().unwrap().clone();
            assert_eq!(vk.dims(), &[2, 2, n, 4]);
            assert_eq!(q.quantized_len(), n - residual.min(n));
            let exact = residual.min(n);
            let tail = |t: &Tensor| host(&t.narrow(2, n - exact, exact).unwrap());
            assert_eq!(tail(&vk), tail(&k), "R {residual}, steps {steps:?}: keys");
            assert_eq!(tail(&vv), tail(&v), "R {residual}, steps {steps:?}: values");
            if n > exact {
                // The older positions went through the codes: close, not equal.
                let head = |t: &Tensor| host(&t.narrow(2, 0, n - exact).unwrap());
                let diff = head(&vk)
                    .iter()
                    .zip(head(&k))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff > 0.0 && diff < 0.05,
                    "R {residual}, steps {steps:?}: keys off by {diff}"
                );
            }
        }
    }

    #[test]
    fn the_exact_window_slides_one_position_per_decoding_step() {
        let mut q = Quantized::new(4, 3, false);
        let mut n = 0;
        for s in [5, 1, 1, 1, 1] {
            fill_from(&mut q, n, s);
            n += s;
            assert_eq!(q.len(), n);
            assert_eq!(q.quantized_len(), n - 3);
            assert_eq!(q.recent.as_ref().unwrap().0.dim(2).unwrap(), 3);
        }
    }

    fn fill_from(q: &mut Quantized, from: usize, s: usize) {
        q.append(&kv(1, 2, from, s, 3, 0.0), &kv(1, 2, from, s, 3, 1.0))
            .unwrap();
    }

    /// The key codes of the first `n` quantized positions, flattened.
    fn first_codes(q: &Quantized, n: usize) -> Vec<u8> {
        let codes = &q.quantized.as_ref().unwrap().0.codes;
        codes
            .narrow(2, 0, n)
            .and_then(|c| c.flatten_all())
            .and_then(|c| c.to_vec1())
            .unwrap()
    }

    #[test]
    fn requantizing_when_the_range_stays_put_keeps_the_codes() {
        // Positions 0..8 quantized, then positions whose values lie inside each
        // channel's range join: the old codes do not move.
        let mut q = Quantized::new(4, 1, false);
        let x = kv(1, 1, 0, 8, 3, 0.0);
        q.append(&x, &x).unwrap();
        q.append(&x.narrow(2, 2, 1).unwrap(), &x.narrow(2, 2, 1).unwrap())
            .unwrap();
        let before = first_codes(&q, 7);
        q.append(&x.narrow(2, 3, 1).unwrap(), &x.narrow(2, 3, 1).unwrap())
            .unwrap();
        let after = first_codes(&q, 7);
        assert_eq!(before, after);
    }

    #[test]
    fn a_pinned_prefix_stays_exact_and_the_rest_is_quantized() {
        for pinned in [true, false] {
            let mut q = Quantized::new(4, 2, pinned);
            let (pk, pv) = (kv(2, 1, 0, 6, 4, 0.2), kv(2, 1, 0, 6, 4, 3.0));
            q.seed(&pk, &pv).unwrap();
            fill_from_prefix(&mut q, 6);
            let (vk, vv) = q.view().unwrap().clone();
            assert_eq!(vk.dims(), &[2, 1, 6 + 7, 4]);
            let head = |t: &Tensor| host(&t.narrow(2, 0, 6).unwrap());
            if pinned {
                assert_eq!(head(&vk), host(&pk));
                assert_eq!(head(&vv), host(&pv));
                assert_eq!(q.quantized_len(), 7 - 2);
            } else {
                assert_ne!(head(&vk), host(&pk));
                assert_eq!(q.quantized_len(), 6 + 7 - 2);
            }
        }
    }

    fn fill_from_prefix(q: &mut Quantized, p: usize) {
        let mut from = p;
        for s in [4, 1, 1, 1] {
            q.append(&kv(2, 1, from, s, 4, 0.2), &kv(2, 1, from, s, 4, 3.0))
                .unwrap();
            from += s;
        }
    }

    #[test]
    fn selecting_rows_moves_codes_scales_and_exact_parts_with_their_row() {
        for pinned in [true, false] {
            let mut q = Quantized::new(8, 2, pinned);
            q.seed(&kv(3, 2, 0, 5, 4, 0.4), &kv(3, 2, 0, 5, 4, 0.9))
                .unwrap();
            let mut from = 5;
            for s in [3, 1, 1] {
                q.append(&kv(3, 2, from, s, 4, 0.4), &kv(3, 2, from, s, 4, 0.9))
                    .unwrap();
                from += s;
            }
            let (k0, v0) = q.view().unwrap().clone();
            let idx = [2u32, 0, 0, 1];
            let sel = |t: &Tensor| -> Result<Tensor> {
                t.contiguous()?
                    .index_select(&Tensor::new(&idx, t.device())?, 0)
            };
            let site = Site::new(
                0,
                crate::engine::diagnosis::Attention::SelfAttn,
                TensorKind::Key,
            );
            q.try_map_rows(|t, _| sel(t).ctx("select rows"), site)
                .unwrap();
            let (k1, v1) = q.view().unwrap().clone();
            assert_eq!(k1.dims(), &[4, 2, 10, 4]);
            // Row i of the selected store is row idx[i] of the original, exactly.
            assert_eq!(host(&k1), host(&sel(&k0).unwrap()));
            assert_eq!(host(&v1), host(&sel(&v0).unwrap()));
            // and goes on like it: the next append quantizes per row.
            let next = |b: usize| kv(b, 2, from, 1, 4, 0.4);
            let mut r = q.clone();
            r.append(&next(4), &next(4)).unwrap();
            assert_eq!(r.len(), 11);
        }
    }
}
