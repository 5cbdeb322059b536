//! Silent wrong outputs: a generation compared with a reference run that must give
//! the same tokens, and the first difference turned into a `divergence` diagnosis that
//! names the step, the row and the first layer whose cache differs.
//!
//! The comparisons:
//! - [`check_reference`]: a case that feeds the prompt in chunks, saves and restores
//!   its cache, or keeps a `rotating` ring is run again without those (whole prefill,
//!   uninterrupted, the time-ordered `sliding` store): chunked = whole prefill, save /
//!   load = uninterrupted, ring = time order.
//! - [`check_padding`] (`checks: {padding: invariant}`): every left-padded input row
//!   generated alone, without its padding, against its rows in the batch.
//! - [`check_rows_alone`] with every row: rows merged into one batch mid-generation
//!   (`generate.merge_rows_at`, [`crate::engine::batching`]) against each row alone.
//!
//! And one measurement: [`quantization_report`], a `quantized` case against the same
//! case run unquantized (`dynamic`), which may differ (by how much is the report).

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::engine::cache::{CacheMode, ChunkMask, ModelCache};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, Result, TensorKind,
};
use crate::engine::generate::{DecodeOptions, DecodeOutput, Generation};

impl Generation<'_> {
    /// The same generation with `opts`.
    fn generate_with(&self, opts: &DecodeOptions) -> Result<DecodeOutput> {
        Generation { opts, ..*self }.generate()
    }
}

/// Logits that differ by more than this (absolute, per element) diverge even when the
/// chosen tokens agree: summation order alone moves them by about 1e-6 here.
pub const LOGIT_TOLERANCE: f32 = 1e-3;

/// The reference a case must agree with, and what it is called in messages; `None`
/// when the case uses none of the settings that must leave the tokens unchanged.
pub fn reference_options(opts: &DecodeOptions) -> Option<(DecodeOptions, String)> {
    let mut what = vec![];
    let mut r = opts.clone();
    if opts.prefill_chunk.is_some() {
        what.push("whole prompt in one prefill");
        r.prefill_chunk = None;
        r.cache.chunk_mask = ChunkMask::LowerRight;
    }
    if opts.save_at.is_some() {
        what.push("cache never saved and restored");
        r.save_at = None;
        r.cache_file = None;
    }
    if let CacheMode::Rotating { window } = opts.cache.mode {
        what.push("time-ordered `sliding` store");
        r.cache.mode = CacheMode::Sliding { window };
    }
    if what.is_empty() {
        return None;
    }
    Some((r, format!("the reference run ({})", what.join("; "))))
}

/// Where two generations first differ.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstDifference {
    /// Generation step (0: the token chosen after the prefill).
    pub step: usize,
    /// Output row.
    pub row: usize,
    /// The row's token in each run at that step (None: the run had stopped).
    pub tokens: (Option<u32>, Option<u32>),
    /// Largest absolute difference of that row's logits at that step.
    pub logit_diff: f32,
}

/// The first step and row at which `rows_a` and `rows_b` (row `i` of one is row
/// `pair[i]` of the other, see [`first_difference`]) choose different tokens or their
/// logits `[N, V]` differ by more than [`LOGIT_TOLERANCE`].
fn first_difference_rows(
    a: &DecodeOutput,
    b: &DecodeOutput,
    pairs: &[(usize, usize)],
) -> Result<Option<FirstDifference>> {
    let steps = a.logits.len().max(b.logits.len());
    for step in 0..steps {
        let (la, lb) = (rows(a.logits.get(step))?, rows(b.logits.get(step))?);
        for &(ra, rb) in pairs {
            let ta = a.tokens.get(ra).and_then(|t| t.get(step)).copied();
            let tb = b.tokens.get(rb).and_then(|t| t.get(step)).copied();
            let diff = match (la.get(ra), lb.get(rb)) {
                (Some(x), Some(y)) => max_abs_diff(x, y),
                _ => f32::INFINITY,
            };
            if ta != tb || diff > LOGIT_TOLERANCE {
                return Ok(Some(FirstDifference {
                    step,
                    row: ra,
                    tokens: (ta, tb),
                    logit_diff: diff,
                }));
            }
        }
    }
    Ok(None)
}

/// The first difference between two generations of the same rows.
pub fn first_difference(a: &DecodeOutput, b: &DecodeOutput) -> Result<Option<FirstDifference>> {
    let n = a.tokens.len().max(b.tokens.len());
    let pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, i)).collect();
    first_difference_rows(a, b, &pairs)
}

/// `[N, V]` logits as host rows (empty when the step did not run).
fn rows(t: Option<&Tensor>) -> Result<Vec<Vec<f32>>> {
    match t {
        Some(t) => t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec2::<f32>())
            .ctx("logits [N, V]"),
        None => Ok(vec![]),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

/// The first self-attention layer whose cache holds other keys or values in `a` than
/// in `b`, compared in time order (a ring is unrolled); `None` when all agree.
pub fn first_differing_layer(a: &ModelCache, b: &ModelCache) -> Result<Option<usize>> {
    for layer in 0..a.num_layers().max(b.num_layers()) {
        let (x, y) = (
            a.stored_self_in_time_order(layer)?,
            b.stored_self_in_time_order(layer)?,
        );
        let differs = match (x, y) {
            (None, None) => false,
            (Some((ka, va)), Some((kb, vb))) => {
                tensors_differ(&ka, &kb)? || tensors_differ(&va, &vb)?
            }
            _ => true,
        };
        if differs {
            return Ok(Some(layer));
        }
    }
    Ok(None)
}

fn tensors_differ(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(true);
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .ctx("cache contents")
    };
    Ok(max_abs_diff(&flat(a)?, &flat(b)?) > LOGIT_TOLERANCE)
}

/// What the caches of the two runs say, for the message.
fn layer_text(layer: Option<usize>) -> String {
    match layer {
        Some(0) => "; the cache of layer 0 already holds other keys or values".to_string(),
        Some(l) => format!(
            "; the caches agree up to layer {}, layer {l}'s differs (its keys come from layer {}'s output)",
            l - 1,
            l - 1
        ),
        None => "; every layer's cache agrees, only the logits differ".to_string(),
    }
}

/// The `divergence` diagnosis of `d`, at the first differing layer when known.
fn diagnosis(
    d: &FirstDifference,
    what: &str,
    layer: Option<usize>,
    place: String,
    hint: &str,
) -> Diagnosis {
    let tok = |t: Option<u32>| t.map_or("nothing".to_string(), |t| t.to_string());
    let chose = if d.tokens.0 == d.tokens.1 {
        format!(
            "the run and {what} both chose {} but their logits differ by up to {:.3e}",
            tok(d.tokens.0),
            d.logit_diff
        )
    } else {
        format!(
            "the run chose {} where {what} chooses {} (logits differ by up to {:.3e})",
            tok(d.tokens.0),
            tok(d.tokens.1),
            d.logit_diff
        )
    };
    let msg = format!("step {} row {}: {chose}{place}", d.step, d.row);
    let mut diag = Diagnosis::new(DiagnosisClass::Divergence, msg).hint(hint);
    if let Some(l) = layer {
        diag = diag.at(l, Attention::SelfAttn, TensorKind::Key);
    }
    diag
}

/// Generate the first `steps` tokens of `g` with the options `a` and `b` again and name
/// the first layer whose cache differs after them.
fn localise(
    g: &Generation,
    (a, b): (&DecodeOptions, &DecodeOptions),
    steps: usize,
) -> Result<Option<usize>> {
    let cut = |o: &DecodeOptions| {
        let mut o = o.clone();
        o.request.max_new_tokens = steps;
        if o.save_at.is_some_and(|s| s + 1 >= steps) {
            // Saving after the last step would only change what is compared.
            o.save_at = None;
        }
        o
    };
    let ca = g.generate_with(&cut(a))?.cache;
    let cb = g.generate_with(&cut(b))?.cache;
    first_differing_layer(&ca, &cb)
}

/// Run the case's reference ([`reference_options`]) and fail with a `divergence`
/// diagnosis when `out` differs from it. Nothing to do when the case has no reference.
pub fn check_reference(g: &Generation, out: &DecodeOutput) -> Result<()> {
    let opts = g.opts;
    let Some((ref_opts, what)) = reference_options(opts) else {
        return Ok(());
    };
    let reference = g.generate_with(&ref_opts)?;
    let Some(d) = first_difference(out, &reference)? else {
        return Ok(());
    };
    let layer = localise(g, (opts, &ref_opts), d.step + 1)?;
    let hint = if opts.prefill_chunk.is_some() && opts.cache.chunk_mask != ChunkMask::LowerRight {
        "a prompt chunk's causal mask must be aligned to the lower right (query i of a chunk starting at position p sits at p + i and sees every earlier key); an upper-left triangle hides the earlier chunks (executorch PR 21749)"
    } else if opts.save_at.is_some() && opts.cache.ring_head_lost_on_load {
        "a rotating cache must save and restore its ring head: restored at slot 0, the next step overwrites a slot that is not the oldest (llama.cpp issue 25295)"
    } else {
        "chunking the prefill, saving and restoring the cache or keeping a ring must not change what is generated: compare the caches of the two runs at that step"
    };
    let place = layer_text(layer);
    Err(diagnosis(&d, &what, layer, place, hint).into())
}

/// `checks: {padding: invariant}`: generate every left-padded input row alone,
/// without its padding, and fail with a `divergence` diagnosis at the first step where
/// its rows in the batch differ from it. `ids: [B, S]`, `pad: [B, S]` (1 = token);
/// `out` has `B * R` rows (R rows per input row).
pub fn check_padding(g: &Generation, out: &DecodeOutput) -> Result<()> {
    let hint = if g.opts.mask_buffer_one_row {
        "every row read the first row's padding mask (a mask buffer sized for one row, candle issue 3582): build the mask [B, P + T] per row"
    } else {
        "left padding changes what the row generates: padding positions count inside a sliding window, or the mask, positions or cache of the batch leak padding into the row"
    };
    check_rows_alone(g, out, false, hint)
}

/// Generate `g`'s input rows alone (every row, or only the left-padded ones) without
/// their padding, and fail with a `divergence` diagnosis (with `hint`) at the first step
/// where `out`'s rows of that input differ from it.
pub fn check_rows_alone(
    g: &Generation,
    out: &DecodeOutput,
    every_row: bool,
    hint: &str,
) -> Result<()> {
    let Generation { opts, ids, pad, .. } = *g;
    let (b, s) = ids.dims2().ctx("input ids [B, S]")?;
    let r = opts.rows_per_input();
    // [B, S]; no mask: every position is a token.
    let mask: Vec<Vec<f32>> = match pad {
        Some(m) => m.to_dtype(DType::F32).and_then(|m| m.to_vec2()),
        None => Ok(vec![vec![1.0; s]; b]),
    }
    .ctx("padding mask [B, S]")?;
    for (i, row_mask) in mask.iter().enumerate().take(b) {
        let start = row_mask.iter().position(|m| *m > 0.5).unwrap_or(s);
        if start == s || (start == 0 && !every_row) {
            // Empty rows, and unpadded ones unless every row is asked for.
            continue;
        }
        let alone = g.row_alone(i, start)?;
        let pairs: Vec<(usize, usize)> = (0..r).map(|j| (i * r + j, j)).collect();
        if let Some(d) = first_difference_rows(out, &alone, &pairs)? {
            let what = if start == 0 {
                "the row generated alone".to_string()
            } else {
                format!("the row generated alone without its {start} padding positions")
            };
            return Err(diagnosis(&d, &what, None, String::new(), hint).into());
        }
    }
    Ok(())
}

/// How far a `quantized` run is from the same case run unquantized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantReport {
    /// The run compared with.
    pub reference: String,
    /// Per output row: the fraction of its generated tokens equal to the unquantized
    /// run's at the same step (a step only one run reached counts as different).
    pub token_agreement_per_row: Vec<f64>,
    /// Equal tokens over all rows and steps, as a fraction (1 when nothing was
    /// generated).
    pub token_agreement: f64,
    pub tokens_equal: usize,
    pub tokens_compared: usize,
    /// The first step and row whose tokens differ: from the next step on, that row's
    /// logits come from different inputs, so its drift there is not the cache's alone.
    pub first_token_difference: Option<StepRow>,
    /// Per step that both runs reached: the largest absolute difference of any logit of
    /// any row.
    pub logit_drift_per_step: Vec<f32>,
    /// The largest of `logit_drift_per_step` (0 when no step ran).
    pub max_logit_drift: f32,
    /// The largest drift over the steps both runs were fed the same tokens: up to and
    /// including `first_token_difference`'s step (every step when no token differs).
    /// What the cache alone moved; later steps compare logits of different inputs.
    /// `checks.quantization.max_logit_drift` bounds this one.
    pub max_logit_drift_same_inputs: f32,
}

/// A generation step and an output row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StepRow {
    pub step: usize,
    pub row: usize,
}

/// Compare `out`, a generation with a `quantized` cache, with `reference`, the same
/// generation unquantized: tokens `[N][n]`, logits n x `[N, V]`.
pub fn compare_quantized(out: &DecodeOutput, reference: &DecodeOutput) -> Result<QuantReport> {
    let rows_n = out.tokens.len().max(reference.tokens.len());
    let mut per_row = Vec::with_capacity(rows_n);
    let (mut equal, mut compared) = (0, 0);
    let mut first: Option<StepRow> = None;
    for row in 0..rows_n {
        let (a, b) = (out.tokens.get(row), reference.tokens.get(row));
        let n = a.map_or(0, Vec::len).max(b.map_or(0, Vec::len));
        let mut same = 0;
        for step in 0..n {
            let (x, y) = (a.and_then(|r| r.get(step)), b.and_then(|r| r.get(step)));
            if x.is_some() && x == y {
                same += 1;
            } else if first.is_none_or(|f| step < f.step) {
                first = Some(StepRow { step, row });
            }
        }
        per_row.push(if n == 0 { 1.0 } else { same as f64 / n as f64 });
        equal += same;
        compared += n;
    }
    let steps = out.logits.len().min(reference.logits.len());
    let mut drift = Vec::with_capacity(steps);
    for step in 0..steps {
        let (la, lb) = (
            rows(out.logits.get(step))?,
            rows(reference.logits.get(step))?,
        );
        let d = if la.len() == lb.len() {
            la.iter()
                .zip(&lb)
                .map(|(x, y)| max_abs_diff(x, y))
                .fold(0.0, f32::max)
        } else {
            f32::INFINITY
        };
        drift.push(d);
    }
    let same_inputs = first.map_or(drift.len(), |f| (f.step + 1).min(drift.len()));
    Ok(QuantReport {
        reference: "the same case with `cache.mode: dynamic`".into(),
        token_agreement_per_row: per_row,
        token_agreement: if compared == 0 {
            1.0
        } else {
            equal as f64 / compared as f64
        },
        tokens_equal: equal,
        tokens_compared: compared,
        first_token_difference: first,
        max_logit_drift: drift.iter().copied().fold(0.0, f32::max),
        max_logit_drift_same_inputs: drift[..same_inputs].iter().copied().fold(0.0, f32::max),
        logit_drift_per_step: drift,
    })
}

/// `opts` with a `quantized` cache: run the same generation with a `dynamic` cache
/// (no save and restore, which changes nothing there) and compare `out` with it.
/// `None` for the other modes.
pub fn quantization_report(g: &Generation, out: &DecodeOutput) -> Result<Option<QuantReport>> {
    if !matches!(g.opts.cache.mode, CacheMode::Quantized { .. }) {
        return Ok(None);
    }
    let mut plain = g.opts.clone();
    plain.cache.mode = CacheMode::Dynamic;
    plain.save_at = None;
    plain.cache_file = None;
    let reference = g.generate_with(&plain)?;
    compare_quantized(out, &reference).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cache::{CacheConfig, Layout};
    use candle_core::Device;

    fn output(tokens: Vec<Vec<u32>>, logits: Vec<Vec<f32>>) -> DecodeOutput {
        // one logits row per output row, the same at every step: [N, V] per step
        let n = tokens.len();
        let v = logits[0].len();
        let flat: Vec<f32> = logits.concat();
        let step = Tensor::from_vec(flat, (n, v), &Device::Cpu).unwrap();
        let steps = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        DecodeOutput {
            tokens,
            logits: vec![step; steps],
            scores: None,
            cache: ModelCache::new(
                CacheConfig::new(CacheMode::Dynamic),
                Layout::Standard,
                1,
                false,
            ),
        }
    }

    #[test]
    fn the_first_difference_names_the_step_and_row_of_a_token_or_a_logit() {
        let a = output(
            vec![vec![1, 2, 3], vec![4, 5, 6]],
            vec![vec![0.0, 1.0], vec![2.0, 3.0]],
        );
        assert_eq!(first_difference(&a, &a.clone()).unwrap(), None);
        let b = output(
            vec![vec![1, 2, 3], vec![4, 9, 6]],
            vec![vec![0.0, 1.0], vec![2.0, 3.0]],
        );
        let d = first_difference(&a, &b).unwrap().unwrap();
        assert_eq!((d.step, d.row, d.tokens), (1, 1, (Some(5), Some(9))));
        // Same tokens, logits apart by more than the tolerance: step 0.
        let c = output(
            vec![vec![1, 2, 3], vec![4, 5, 6]],
            vec![vec![0.0, 1.0], vec![2.0, 3.01]],
        );
        let d = first_difference(&a, &c).unwrap().unwrap();
        assert_eq!((d.step, d.row), (0, 1));
        assert!((d.logit_diff - 0.01).abs() < 1e-4);
        // Within the tolerance: no difference.
        let e = output(
            vec![vec![1, 2, 3], vec![4, 5, 6]],
            vec![vec![0.0, 1.0], vec![2.0, 3.0005]],
        );
        assert_eq!(first_difference(&a, &e).unwrap(), None);
        // A run that stopped early differs where the other goes on.
        let f = output(
            vec![vec![1, 2], vec![4, 5]],
            vec![vec![0.0, 1.0], vec![2.0, 3.0]],
        );
        let d = first_difference(&a, &f).unwrap().unwrap();
        assert_eq!((d.step, d.row, d.tokens), (2, 0, (Some(3), None)));
        let msg = diagnosis(&d, "the reference", Some(1), layer_text(Some(1)), "h").to_string();
        assert!(msg.starts_with("divergence at layer 1 self key: step 2 row 0: the run chose 3 where the reference chooses nothing"), "{msg}");
    }

    #[test]
    fn the_reference_drops_exactly_the_settings_that_must_not_matter() {
        let mut o = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 4);
        assert!(reference_options(&o).is_none());
        o.prefill_chunk = Some(3);
        o.cache.chunk_mask = ChunkMask::UpperLeft;
        o.save_at = Some(1);
        o.cache.mode = CacheMode::Rotating { window: 6 };
        o.mask_buffer_one_row = true;
        let (r, what) = reference_options(&o).unwrap();
        assert_eq!(r.prefill_chunk, None);
        assert_eq!(r.cache.chunk_mask, ChunkMask::LowerRight);
        assert_eq!(r.save_at, None);
        assert_eq!(r.cache.mode, CacheMode::Sliding { window: 6 });
        // Not a setting that must leave the tokens unchanged: kept.
        assert!(r.mask_buffer_one_row);
        assert_eq!(r.request.max_new_tokens, 4);
        assert!(
            what.contains("whole prompt")
                && what.contains("never saved")
                && what.contains("`sliding`"),
            "{what}"
        );
    }

    /// Layers that hold nothing in both caches agree; the first layer with other keys is
    /// found past them; equal caches give `None`.
    #[test]
    fn the_first_differing_layer_skips_layers_empty_in_both() {
        let kv = |x: f32| Tensor::full(x, (1, 1, 2, 4), &Device::Cpu).unwrap(); // [B, H, S, D]
        let cache = |last: f32| {
            let mut c = ModelCache::new(
                CacheConfig::new(CacheMode::Dynamic),
                Layout::Standard,
                3,
                false,
            );
            c.update_self(0, &kv(1.0), &kv(1.0), (0, 2)).unwrap();
            // layer 1 is never written
            c.update_self(2, &kv(last), &kv(1.0), (0, 2)).unwrap();
            c
        };
        assert_eq!(
            first_differing_layer(&cache(1.0), &cache(1.0)).unwrap(),
            None
        );
        assert_eq!(
            first_differing_layer(&cache(1.0), &cache(2.0)).unwrap(),
            Some(2)
        );
    }

    /// Token agreement is the share of equal tokens over all rows (3 of 4 here), per
    /// row too; two empty generations agree fully.
    #[test]
    fn token_agreement_counts_equal_tokens_over_all_rows() {
        let logits = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        let q = output(vec![vec![1, 1], vec![0, 1]], logits.clone());
        let d = output(vec![vec![1, 1], vec![0, 0]], logits);
        let r = compare_quantized(&q, &d).unwrap();
        assert_eq!((r.tokens_equal, r.tokens_compared), (3, 4));
        assert_eq!(r.token_agreement, 0.75);
        assert_eq!(r.token_agreement_per_row, vec![1.0, 0.5]);
        let empty = output(vec![vec![], vec![]], vec![vec![0.0], vec![0.0]]);
        let r = compare_quantized(&empty, &empty).unwrap();
        assert_eq!((r.tokens_compared, r.token_agreement), (0, 1.0));
    }
}
