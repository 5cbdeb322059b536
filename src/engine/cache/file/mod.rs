//! A cache written to a safetensors file and read back into a fresh cache
//! (`cache.save_at`), in every mode and layout.
//!
//! Format, version 1. A safetensors file whose tensors are stored as f32 (the codes of
//! a `quantized` cache as u8):
//! - `self.{layer}.key`, `self.{layer}.value`: what the layer's self-attention cache
//!   holds, raw, in the layout it stores (standard `[B, KVH, K, D]`; bloom-legacy keys
//!   `[B*KVH, D, K]` and values `[B*KVH, K, D]`; bigcode-fused `[B, K, 2D]`; ring order
//!   for `rotating`). With `none`, the prefix it keeps. With `quantized`, only the last
//!   `T <= R` positions, kept exact, `[B, KVH, T, D]`; and besides them:
//!   - `self.{layer}.key_codes`, `self.{layer}.value_codes`: the older positions as
//!     codes, u8 `[B, KVH, Q, D]`;
//!   - `self.{layer}.key_scale`, `self.{layer}.key_zero`, `self.{layer}.value_scale`,
//!     `self.{layer}.value_zero`: their scale and zero point per channel, f32
//!     `[B, KVH, 1, D]`;
//!   - `self.{layer}.prefix_key`, `self.{layer}.prefix_value`: the prefix kept exact
//!     (`prefix_full_precision`), `[B, KVH, P, D]`.
//!
//!   Each part is present when it holds positions (the layer's `quantized` entry in
//!   the state gives P, Q and T).
//! - `cross.{layer}.key`, `cross.{layer}.value`: encoder-decoders, the computed cross
//!   keys and values `[B, KVH, P+E, D]`;
//!   `cross.{layer}.prefix_key`, `cross.{layer}.prefix_value`: the cross prefix
//!   `[B, KVH, P, D]`.
//!
//! The `__metadata__` holds `format` = `prefix-harness-cache`, `version` = `1` and
//! `state`, the JSON of [`SavedState`]: the mode, layout, window, key/value heads and
//! dtype of the cache, and per layer the positions seen, the prefix length, whether
//! the prefix was not yet merged, and the ring head; for `quantized` also the bits,
//! residual and `prefix_full_precision`, and per layer P, Q and T (both entries are
//! absent for the other modes, whose files are unchanged). Reading checks all of it
//! against the cache it fills: a file of another mode, layout, window, quantization or
//! layer count, a truncated file or a missing tensor is a clear error naming the file.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::quant::Codes;
use super::stores::push_pair;
use super::{shapes, CacheMode, ModelCache};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result, Site, TensorKind};
use crate::engine::trace::{event, CacheOp};

const FORMAT: &str = "prefix-harness-cache";
const VERSION: &str = "1";

/// The metadata of a saved cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    /// [`CacheMode::name`]
    pub mode: String,
    /// `static`: capacity; `sliding` / `rotating`: window.
    pub capacity: Option<usize>,
    /// [`super::Layout::name`]
    pub layout: String,
    pub kv_heads: Option<usize>,
    /// The dtype the tensors had (they are stored as f32).
    pub dtype: Option<String>,
    pub layers: Vec<SavedLayer>,
    pub cross: Vec<SavedCross>,
    /// `quantized`: its settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<SavedQuantization>,
}

/// The settings of a saved `quantized` cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQuantization {
    pub bits: u8,
    pub residual: usize,
    pub prefix_full_precision: bool,
}

/// The parts of one layer of a saved `quantized` cache, in positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQuantLayer {
    /// P: the prefix kept exact (`prefix.key`, `prefix.value`).
    pub pinned: usize,
    /// Q: positions held as codes (`key_codes`, `key_scale`, `key_zero`, ...).
    pub quantized: usize,
    /// T: the last positions, exact (`key`, `value`).
    pub recent: usize,
}

/// One self-attention layer of a saved cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLayer {
    /// Positions written so far, prefix and evicted ones included.
    pub seen: usize,
    pub prefix_len: usize,
    /// The tensors are the prefix as seeded, not yet merged into the store (`none`).
    pub pending_prefix: bool,
    /// `rotating`: the slot the next position goes to.
    pub head: usize,
    /// Whether tensors were saved for this layer.
    pub held: bool,
    /// `quantized` (once the prefix is merged): the parts saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantized: Option<SavedQuantLayer>,
}

/// One cross-attention layer of a saved cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCross {
    pub prefix_len: usize,
    pub is_updated: bool,
    pub has_kv: bool,
    pub has_prefix: bool,
}

fn capacity(mode: CacheMode) -> Option<usize> {
    match mode {
        CacheMode::Static { max_len } => Some(max_len),
        CacheMode::Sliding { window } | CacheMode::Rotating { window } => Some(window),
        CacheMode::Hybrid { max_len } => max_len,
        _ => None,
    }
}

fn quantization(mode: CacheMode) -> Option<SavedQuantization> {
    match mode {
        CacheMode::Quantized {
            bits,
            residual,
            prefix_full_precision,
        } => Some(SavedQuantization {
            bits,
            residual,
            prefix_full_precision,
        }),
        _ => None,
    }
}

/// Positions along dimension 2 of `[B, KVH, n, D]` parts.
pub(super) fn positions(pair: Option<&(Tensor, Tensor)>) -> usize {
    pair.and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
}

fn bad(path: &Path, what: impl std::fmt::Display) -> EngineError {
    EngineError::Config(format!("cache file {}: {what}", path.display()))
}

impl ModelCache {
    /// Write the cache to `path` (atomically: a temporary file renamed into place) and
    /// record a [`CacheOp::Save`] event per layer.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = vec![];
        let mut dtype = None;
        let mut layers = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            let held = l.held();
            if let Some((k, _)) = &held {
                dtype = Some(k.dtype().as_str().to_string());
            }
            let mut saved = SavedLayer {
                seen: l.seen,
                prefix_len: l.prefix_len,
                pending_prefix: l.prefix.is_some(),
                head: l.store.ring_head().unwrap_or(0),
                held: held.is_some(),
                quantized: None,
            };
            let name = format!("self.{i}.");
            match &l.prefix {
                Some((k, v)) => push_pair(&mut tensors, &name, k.clone(), v.clone()),
                None => l.store.save(&name, &mut tensors, &mut saved),
            }
            layers.push(saved);
        }
        let mut cross = vec![];
        for (i, c) in self.cross.iter().enumerate() {
            if let Some((k, v)) = &c.kv {
                tensors.push((format!("cross.{i}.key"), k.clone()));
                tensors.push((format!("cross.{i}.value"), v.clone()));
            }
            if let Some((k, v)) = &c.prefix {
                tensors.push((format!("cross.{i}.prefix_key"), k.clone()));
                tensors.push((format!("cross.{i}.prefix_value"), v.clone()));
            }
            cross.push(SavedCross {
                prefix_len: c.prefix_len,
                is_updated: c.is_updated,
                has_kv: c.kv.is_some(),
                has_prefix: c.prefix.is_some(),
            });
        }
        let state = SavedState {
            mode: self.config.mode.name().to_string(),
            capacity: capacity(self.config.mode),
            layout: self.layout.name().to_string(),
            kv_heads: self.kv_heads,
            dtype,
            layers,
            cross,
            quantization: quantization(self.config.mode),
        };
        let state_json = serde_json::to_string(&state)
            .map_err(|e| EngineError::Config(format!("cache state: {e}")))?;
        let bytes = crate::io::adapter::safetensors_bytes_with(
            &tensors,
            &[
                ("format", FORMAT),
                ("version", VERSION),
                ("state", &state_json),
            ],
        )?;
        crate::io::adapter::write_file_atomic(path, &bytes)?;
        self.trace_file_op(CacheOp::Save);
        Ok(())
    }

    /// An empty cache of the same mode, layout, layers and key/value heads, carrying
    /// this cache's trace: what [`ModelCache::restore`] fills.
    pub fn emptied(&self) -> ModelCache {
        let mut fresh = ModelCache::new(
            self.config.clone(),
            self.layout,
            self.layers.len(),
            !self.cross.is_empty(),
        );
        // `new` picks the layout from the mode; keep the one this cache stores.
        fresh.layout = self.layout;
        fresh.kv_heads = self.kv_heads;
        fresh.trace = self.trace.clone();
        fresh
    }

    /// Fill this (empty) cache from a file written by [`ModelCache::save`]; records a
    /// [`CacheOp::Load`] event per layer. With `ring_head_lost_on_load` (historical)
    /// a ring's head is reset to slot 0.
    pub fn restore(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
        let state = read_state(path, &bytes)?;
        self.check_state(path, &state)?;
        let dtype = match &state.dtype {
            Some(d) => d
                .parse::<DType>()
                .map_err(|_| bad(path, format!("unknown dtype `{d}` in its state")))?,
            None => DType::F32,
        };
        let mut stored = Stored {
            tensors: candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| bad(path, format!("not a readable safetensors file: {e}")))?,
            path,
            dtype,
        };
        let lost_head = self.config.ring_head_lost_on_load;
        for (i, (l, s)) in self.layers.iter_mut().zip(&state.layers).enumerate() {
            l.seen = s.seen;
            l.prefix_len = s.prefix_len;
            if !s.held {
                continue;
            }
            let name = format!("self.{i}.");
            // A prefix not yet merged, or a store that keeps nothing: what the file
            // holds is the layer's prefix.
            if s.pending_prefix || !l.store.keeps_positions() {
                l.prefix = Some(stored.key_value(&name)?);
                continue;
            }
            let mut from = LayerFile {
                name,
                state: s.clone(),
                file: &mut stored,
                site: Site::new(i, Attention::SelfAttn, TensorKind::Key),
            };
            if lost_head {
                // Historical: the ring head is read as slot 0.
                from.state.head = 0;
            }
            l.store.load(&mut from)?;
        }
        for (i, (c, s)) in self.cross.iter_mut().zip(&state.cross).enumerate() {
            c.prefix_len = s.prefix_len;
            c.is_updated = s.is_updated;
            if s.has_kv {
                c.kv = Some((
                    stored.take(format!("cross.{i}.key"))?,
                    stored.take(format!("cross.{i}.value"))?,
                ));
            }
            if s.has_prefix {
                c.prefix = Some((
                    stored.take(format!("cross.{i}.prefix_key"))?,
                    stored.take(format!("cross.{i}.prefix_value"))?,
                ));
            }
        }
        self.trace_file_op(CacheOp::Load);
        Ok(())
    }

    /// One `op` event (`Save` or `Load`) per self-attention layer: the stored key and
    /// value shapes (before a save, after a load; the raw stored layout) and the ring
    /// head.
    fn trace_file_op(&mut self, op: CacheOp) {
        for (i, l) in self.layers.iter().enumerate() {
            let mut e = event(i, Attention::SelfAttn, op, self.layout);
            let (key, value) = shapes(l.held().as_ref());
            if op == CacheOp::Save {
                (e.shapes.key_before, e.shapes.value_before) = (key, value);
            } else {
                (e.shapes.key_after, e.shapes.value_after) = (key, value);
            }
            e.ring_head = l.store.ring_head();
            self.trace.push(e);
        }
    }

    /// The file's state against this cache: same mode, capacity, layout, layers.
    fn check_state(&self, path: &Path, s: &SavedState) -> Result<()> {
        let mine = (self.config.mode.name(), capacity(self.config.mode));
        if (s.mode.as_str(), s.capacity) != mine {
            return Err(bad(
                path,
                format!(
                    "written by a `{}` cache (capacity {:?}) but read into a `{}` cache (capacity {:?})",
                    s.mode, s.capacity, mine.0, mine.1
                ),
            ));
        }
        let q = quantization(self.config.mode);
        if s.quantization != q {
            let text = |q: Option<SavedQuantization>| match q {
                Some(q) => format!(
                    "{} bits, residual {}, prefix_full_precision {}",
                    q.bits, q.residual, q.prefix_full_precision
                ),
                None => "no quantization".into(),
            };
            return Err(bad(
                path,
                format!(
                    "written by a cache with {} but read into one with {}",
                    text(s.quantization),
                    text(q)
                ),
            ));
        }
        if s.layout != self.layout.name() {
            return Err(bad(
                path,
                format!(
                    "holds the `{}` layout but this cache stores `{}`",
                    s.layout,
                    self.layout.name()
                ),
            ));
        }
        if s.layers.len() != self.layers.len() || s.cross.len() != self.cross.len() {
            return Err(bad(
                path,
                format!(
                    "holds {} self-attention and {} cross-attention layers but this model has {} and {}",
                    s.layers.len(),
                    s.cross.len(),
                    self.layers.len(),
                    self.cross.len()
                ),
            ));
        }
        if let (Some(a), Some(b)) = (s.kv_heads, self.kv_heads) {
            if a != b {
                return Err(bad(
                    path,
                    format!("holds {a} key/value heads but this model has {b}"),
                ));
            }
        }
        Ok(())
    }
}

/// One self-attention layer's part of a cache file being read.
pub(super) struct LayerFile<'a, 'p> {
    /// `self.{layer}.`: how the names of the layer's tensors begin.
    pub name: String,
    /// The layer's entry in the file's state.
    pub state: SavedLayer,
    pub file: &'a mut Stored<'p>,
    /// The layer, for errors.
    pub site: Site,
}

impl LayerFile<'_, '_> {
    /// The keys and values `{name}key`, `{name}value`, in the cache's dtype.
    pub fn key_value(&mut self) -> Result<(Tensor, Tensor)> {
        self.file.key_value(&self.name)
    }
}

/// The tensors of a cache file, taken by name.
pub(super) struct Stored<'a> {
    tensors: std::collections::HashMap<String, Tensor>,
    path: &'a Path,
    /// The dtype the cache held (tensors are stored as f32).
    pub dtype: DType,
}

impl Stored<'_> {
    /// An error naming the file.
    pub fn bad(&self, what: impl std::fmt::Display) -> EngineError {
        bad(self.path, what)
    }

    /// The keys and values `{name}key`, `{name}value`, in the cache's dtype.
    pub fn key_value(&mut self, name: &str) -> Result<(Tensor, Tensor)> {
        Ok((
            self.take(format!("{name}key"))?,
            self.take(format!("{name}value"))?,
        ))
    }

    /// The tensor `name` as stored, or a clear error.
    fn raw(&mut self, name: String) -> Result<Tensor> {
        self.tensors.remove(&name).ok_or_else(|| {
            bad(
                self.path,
                format!("the tensor `{name}` its state announces is missing"),
            )
        })
    }

    /// The tensor `name` in the cache's dtype.
    fn take(&mut self, name: String) -> Result<Tensor> {
        self.raw(name)?
            .to_dtype(self.dtype)
            .ctx("cache file: convert dtype")
    }

    /// Keys and values `{prefix}key`, `{prefix}value` (`[B, KVH, n, D]`) when the state
    /// says they hold `n > 0` positions; checks n.
    pub fn pair(&mut self, prefix: &str, n: usize) -> Result<Option<(Tensor, Tensor)>> {
        if n == 0 {
            return Ok(None);
        }
        let pair = self.key_value(prefix)?;
        let got = positions(Some(&pair));
        if got != n || pair.0.dims() != pair.1.dims() {
            return Err(bad(
                self.path,
                format!(
                    "`{prefix}key` {:?} and `{prefix}value` {:?} should hold the {n} positions its state announces",
                    pair.0.dims(),
                    pair.1.dims()
                ),
            ));
        }
        Ok(Some(pair))
    }

    /// The codes `{prefix}codes` (u8 `[B, KVH, Q, D]`), `{prefix}scale` and
    /// `{prefix}zero` (f32 `[B, KVH, 1, D]`) of Q positions.
    pub fn codes(&mut self, prefix: &str, q: usize) -> Result<Codes> {
        let codes = self
            .raw(format!("{prefix}codes"))?
            .to_dtype(DType::U8)
            .ctx("cache file: codes")?;
        let scale = self
            .raw(format!("{prefix}scale"))?
            .to_dtype(DType::F32)
            .ctx("cache file: scales")?;
        let zero = self
            .raw(format!("{prefix}zero"))?
            .to_dtype(DType::F32)
            .ctx("cache file: zero points")?;
        let (c, sc, z) = (codes.dims(), scale.dims(), zero.dims());
        let channels = |d: &[usize]| {
            let mut d = d.to_vec();
            if d.len() == 4 {
                d[2] = 1;
            }
            d
        };
        if c.len() != 4 || c[2] != q || sc != channels(c) || z != channels(c) {
            return Err(bad(
                self.path,
                format!(
                    "`{prefix}codes` {c:?}, `{prefix}scale` {sc:?} and `{prefix}zero` {z:?} should be [B, KVH, {q}, D] and [B, KVH, 1, D] twice"
                ),
            ));
        }
        Ok(Codes { codes, scale, zero })
    }
}

/// The `__metadata__` of a cache file: format, version and state.
fn read_state(path: &Path, bytes: &[u8]) -> Result<SavedState> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
        .ok_or_else(|| bad(path, "shorter than a safetensors header (8 bytes)"))?;
    let header = bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| {
        bad(
            path,
            format!("its header announces {n} bytes but the file is truncated"),
        )
    })?;
    let header: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| bad(path, format!("its header is not JSON: {e}")))?;
    let meta = header.get("__metadata__").cloned().unwrap_or_default();
    let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let (format_field, version_field) = (field("format"), field("version"));
    if format_field != FORMAT {
        let why = format!("not a prefix-harness cache (its metadata `format` is `{format_field}`, expected `{FORMAT}`)");
        return Err(bad(path, why));
    }
    if version_field != VERSION {
        let why =
            format!("cache format version `{version_field}`; this build reads version {VERSION}");
        return Err(bad(path, why));
    }
    serde_json::from_str(field("state"))
        .map_err(|e| bad(path, format!("its `state` metadata is not valid: {e}")))
}

#[cfg(test)]
mod tests;
