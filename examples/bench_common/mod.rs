//! What the benchmark examples (`bench_m2.rs`, `bench_m3.rs`) share: the median of
//! timings, `--name N` arguments, flags, and the synthetic training batch. Not an
//! example of its own (no `main.rs`); each bench includes it with `#[path]`, and not
//! every bench uses every helper.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::train::{Batch, IGNORE_INDEX};

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the flag `name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Deterministic ids `[b, s]` below `vocab` (the formula the Python sides use) and the
/// training batch over them: no padding, labels = the ids shifted left
/// ([`IGNORE_INDEX`] at each row's last position).
pub fn synthetic_batch(b: usize, s: usize, vocab: usize, dev: &Device) -> anyhow::Result<Batch> {
    let ids: Vec<u32> = (0..b * s)
        .map(|i| ((i as u64 * 2_654_435_761 + 12_345) % vocab as u64) as u32)
        .collect();
    let labels: Vec<i64> = (0..b * s)
        .map(|i| {
            if i % s == s - 1 {
                IGNORE_INDEX
            } else {
                i64::from(ids[i + 1])
            }
        })
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, s), dev)?,
        mask: Tensor::ones((b, s), DType::F32, dev)?,
        decoder: None,
        labels: Tensor::from_vec(labels, (b, s), dev)?,
    })
}
