//! The `rotating` store: the last W positions of a layer in a ring of W slots.
//!
//! While the ring is filling, slots are in time order and `head` is the next free
//! slot. Once it is full, a one-token step overwrites slot `head` (the oldest
//! position) in place and moves `head` on, as transformers' static sliding layers,
//! mlx-lm's `RotatingKVCache` and candle-nn's `RotatingKvCache` do; a step of several
//! tokens (a prefill or a prompt chunk) keeps the last W positions of what the
//! attention read, in time order, with `head` at slot 0. Reads unroll the ring to time
//! order (`slots head..W, then 0..head`), so the mask and position biases see the same
//! key order as the time-ordered `sliding` store.

use candle_core::{Result, Tensor};

use super::file::LayerFile;
use super::stores::{load_refill, select_refill, KvStore, Refill, Select, Step};
use crate::engine::diagnosis::{CandleExt, Site};

/// One layer's ring.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// `[B, KVH, L, D]`, `L <= W` slots, in ring order.
    pub k: Option<Tensor>,
    /// `[B, KVH, L, D]`
    pub v: Option<Tensor>,
    /// The slot the next position is written to (`L` while filling; the oldest slot
    /// once full).
    pub head: usize,
}

impl Ring {
    /// Slots held `L`.
    pub fn len(&self) -> usize {
        self.k.as_ref().and_then(|k| k.dim(2).ok()).unwrap_or(0)
    }

    /// The held keys and values in time order, `([B, KVH, L, D], [B, KVH, L, D])`.
    pub fn unrolled(&self) -> Result<Option<(Tensor, Tensor)>> {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return Ok(None);
        };
        let len = k.dim(2)?;
        if self.head == 0 || self.head >= len {
            return Ok(Some((k.clone(), v.clone())));
        }
        let unroll = |t: &Tensor| -> Result<Tensor> {
            let newer = t.narrow(2, 0, self.head)?;
            let older = t.narrow(2, self.head, len - self.head)?;
            Tensor::cat(&[&older, &newer], 2)
        };
        Ok(Some((unroll(k)?, unroll(v)?)))
    }

    /// Store a step: `read_k, read_v: [B, KVH, L + S, D]` are what the attention read
    /// (the unrolled ring, then the step's keys), `k_new, v_new: [B, KVH, S, D]` the
    /// step's own keys and values; `window` is W.
    pub fn store(
        &mut self,
        read_k: &Tensor,
        read_v: &Tensor,
        k_new: &Tensor,
        v_new: &Tensor,
        window: usize,
    ) -> Result<()> {
        let s_new = k_new.dim(2)?;
        let len = self.len();
        if s_new == 1 && len == window && self.head < window {
            // In place: the oldest slot takes the new position.
            self.k = Some(write_slot(self.k.as_ref(), self.head, k_new)?);
            self.v = Some(write_slot(self.v.as_ref(), self.head, v_new)?);
            self.head = (self.head + 1) % window;
            return Ok(());
        }
        let total = read_k.dim(2)?;
        let keep = total.min(window);
        self.k = Some(read_k.narrow(2, total - keep, keep)?.detach());
        self.v = Some(read_v.narrow(2, total - keep, keep)?.detach());
        self.head = keep % window.max(1);
        Ok(())
    }
}

impl KvStore for Ring {
    /// The slots in ring order.
    fn held(&self) -> Option<(Tensor, Tensor)> {
        self.k.clone().zip(self.v.clone())
    }

    fn in_time_order(&self) -> Result<Option<(Tensor, Tensor)>> {
        self.unrolled()
    }

    fn append(&mut self, step: &Step) -> crate::engine::diagnosis::Result<(Tensor, Tensor)> {
        let before = step.before(|| self.unrolled().at(step.site_k, "unroll ring"))?;
        // [B, KVH, L + S, D]
        let (rk, rv) = step.after(before.as_ref())?;
        self.store(&rk, &rv, step.k, step.v, step.keep)
            .at(step.site_k, "write ring")?;
        Ok((rk, rv))
    }

    /// Every row's slots move together; the head stays.
    fn select_rows(&mut self, sel: Select, site: Site) -> crate::engine::diagnosis::Result<()> {
        select_refill(self, sel, site)
    }

    /// The slots in ring order and the head the file's state gives.
    fn load(&mut self, from: &mut LayerFile) -> crate::engine::diagnosis::Result<()> {
        load_refill(self, from)?;
        self.head = from.state.head;
        Ok(())
    }

    fn evicts(&self) -> bool {
        true
    }

    fn ring_head(&self) -> Option<usize> {
        Some(self.head)
    }
}

impl Refill for Ring {
    /// The slots, in ring order; the head stays.
    fn refill(
        &mut self,
        k: Tensor,
        v: Tensor,
        _: Site,
        _: &str,
    ) -> crate::engine::diagnosis::Result<()> {
        (self.k, self.v) = (Some(k), Some(v));
        Ok(())
    }
}

/// `ring: [B, KVH, W, D]` with slot `slot` replaced by `new: [B, KVH, 1, D]`.
fn write_slot(ring: Option<&Tensor>, slot: usize, new: &Tensor) -> Result<Tensor> {
    let Some(ring) = ring else {
        return Ok(new.detach());
    };
    let w = ring.dim(2)?;
    let mut parts = vec![];
    if slot > 0 {
        parts.push(ring.narrow(2, 0, slot)?);
    }
    parts.push(new.detach());
    if slot + 1 < w {
        parts.push(ring.narrow(2, slot + 1, w - slot - 1)?);
    }
    Tensor::cat(&parts, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `[1, 1, n, 1]` holding the positions `from..from + n`.
    fn pos(from: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (from..from + n).map(|p| p as f32).collect();
        Tensor::from_vec(v, (1, 1, n, 1), &Device::Cpu).unwrap()
    }

    fn positions(t: &Tensor) -> Vec<usize> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| x as usize)
            .collect()
    }

    /// Feed `steps` (token counts) through a ring of `window` and a plain time-ordered
    /// list; after every step the unrolled ring holds the last `window` positions.
    fn run(window: usize, steps: &[usize]) -> Ring {
        let mut r = Ring::default();
        let mut seen = 0;
        for &s in steps {
            let base = r.unrolled().unwrap();
            let new = pos(seen, s);
            let read = match &base {
                Some((k, _)) => Tensor::cat(&[k, &new], 2).unwrap(),
                None => new.clone(),
            };
            r.store(&read, &read, &new, &new, window).unwrap();
            seen += s;
            let (k, _) = r.unrolled().unwrap().unwrap();
            let want: Vec<usize> = (seen.saturating_sub(window)..seen).collect();
            assert_eq!(positions(&k), want, "window {window}, steps {steps:?}");
        }
        r
    }

    #[test]
    fn the_unrolled_ring_holds_the_last_window_positions_in_time_order() {
        run(4, &[3, 1, 1, 1, 1, 1, 1]);
        run(4, &[6, 1, 1, 1, 2, 1, 1, 1, 1, 1]);
        run(1, &[2, 1, 1]);
        run(5, &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn a_full_ring_writes_one_token_in_place_at_its_head() {
        // A 6-token step keeps positions 2..6 in time order with head 0; then one
        // token (position 6) replaces slot 0, which held the oldest (2).
        let r = run(4, &[6, 1]);
        assert_eq!(positions(r.k.as_ref().unwrap()), [6, 3, 4, 5]);
        assert_eq!(r.head, 1);
        let r = run(4, &[6, 1, 1, 1, 1]);
        assert_eq!(positions(r.k.as_ref().unwrap()), [6, 7, 8, 9]);
        assert_eq!(r.head, 0);
    }

    #[test]
    fn a_ring_read_with_the_wrong_head_is_out_of_time_order() {
        let mut r = run(4, &[6, 1, 1]);
        assert_eq!(r.head, 2);
        r.head = 0;
        let (k, _) = r.unrolled().unwrap().unwrap();
        assert_eq!(positions(&k), [6, 7, 4, 5]);
    }
}
