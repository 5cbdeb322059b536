//! Helpers shared by the engine tests: tiny seeded models, prompts, comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use prefix_harness::cache::{CacheMode, Layout};
use prefix_harness::model::{weights, Family, Model, ModelConfig};
use prefix_harness::prefix::{PrefixConfig, PrefixEncoder};

pub const SEED: u64 = 20261128;

pub fn tiny_model(family: Family) -> Box<dyn Model> {
    ModelConfig::tiny(family)
        .build(weights::seeded(SEED, DType::F32, &Device::Cpu))
        .expect("tiny model builds")
}

pub fn prefix(model: &dyn Model, p: usize) -> PrefixEncoder {
    let mut cfg = PrefixConfig::new(p);
    cfg.seed = SEED + 1;
    PrefixEncoder::new(&cfg, &model.geometry(), &Device::Cpu).expect("prefix builds")
}

/// A cache mode by its rstest name, with the static capacity and sliding window given.
pub fn cache_mode(name: &str, static_max_len: usize, window: usize) -> CacheMode {
    match name {
        "none" => CacheMode::None,
        "dynamic" => CacheMode::Dynamic,
        "static" => CacheMode::Static {
            max_len: static_max_len,
        },
        "sliding" => CacheMode::Sliding { window },
        "legacy" => CacheMode::Legacy,
        "hybrid" => CacheMode::Hybrid { max_len: None },
        other => panic!("unknown mode {other}"),
    }
}

/// A `[B, S]` prompt of distinct-looking rows (row r is shifted by 37 r).
pub fn prompt(batch: usize, seq: usize) -> Tensor {
    let data: Vec<u32> = (0..batch)
        .flat_map(|r| (0..seq).map(move |i| ((i * 13 + r * 37 + 5) % 250) as u32 + 3))
        .collect();
    Tensor::from_vec(data, (batch, seq), &Device::Cpu).expect("prompt")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// The shape a stored self-attention key must have in `layout`.
pub fn stored_key_shape(layout: Layout, b: usize, kvh: usize, len: usize, d: usize) -> Vec<usize> {
    match layout {
        Layout::Standard => vec![b, kvh, len, d],
        Layout::BloomLegacy => vec![b * kvh, d, len],
        Layout::BigcodeFused => vec![b, len, 2 * d],
    }
}

/// The shape a stored self-attention value must have in `layout` (keys: see
/// [`stored_key_shape`]).
pub fn stored_value_shape(
    layout: Layout,
    b: usize,
    kvh: usize,
    len: usize,
    d: usize,
) -> Vec<usize> {
    match layout {
        Layout::Standard => vec![b, kvh, len, d],
        Layout::BloomLegacy => vec![b * kvh, len, d],
        Layout::BigcodeFused => vec![b, len, 2 * d],
    }
}

/// The batch rows a stored tensor of `layout` holds (Bloom's legacy layout folds the
/// KV heads into its first dimension).
pub fn stored_batch(layout: Layout, shape: &[usize], kvh: usize) -> usize {
    let first = shape.first().copied().unwrap_or(0);
    match layout {
        Layout::BloomLegacy => first / kvh.max(1),
        _ => first,
    }
}

/// A temporary folder removed on drop: `<temp>/ph-<pid>-<tag>-<n>`.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ph-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
