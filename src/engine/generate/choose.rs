//! How the next token is chosen from a row of logits, on the host in f64: the seeded
//! [`Sampler`] (temperature, top-k, top-p), beam hypotheses ([`Beams`]) and the
//! portable `exp` / `ln` / `pow` they use, so that the same logits give the same
//! tokens on every platform.

use crate::engine::diagnosis::{Diagnosis, DiagnosisClass, EngineError, Result};
use crate::engine::rng::Rng;

fn non_finite(what: &str) -> EngineError {
    Diagnosis::new(
        DiagnosisClass::NonFinite,
        format!("the next-token logits contain NaN or +inf ({what})"),
    )
    .hint(
        "NaN or infinity in weights, prefix or activations (check the prefix values and the mask)",
    )
    .into()
}

/// Log-softmax of one row of logits, in f64 with the portable `exp`/`ln`; the sum runs
/// in index order, so the result is the same on every platform for the same logits.
pub fn log_softmax(row: &[f32]) -> Result<Vec<f64>> {
    if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(non_finite("log-softmax"));
    }
    let m = row.iter().fold(f64::NEG_INFINITY, |m, x| {
        if (*x as f64) > m {
            *x as f64
        } else {
            m
        }
    });
    if m == f64::NEG_INFINITY {
        return Err(non_finite("every logit is -inf"));
    }
    let sum: f64 = row.iter().map(|x| pmath::exp(*x as f64 - m)).sum();
    let lse = pmath::ln(sum);
    Ok(row.iter().map(|x| (*x as f64 - m) - lse).collect())
}

/// A portable token sampler: temperature, then top-k, then top-p (nucleus), then one
/// multinomial draw.
///
/// Why not candle-transformers' `LogitsProcessor`: it draws from `rand`'s `StdRng`,
/// whose algorithm `rand` documents as not reproducible across its versions, through
/// `WeightedIndex` on f32 weights and `exp` from the platform maths library. This
/// sampler draws one number per token from [`Rng`] (SplitMix64, integer arithmetic),
/// computes the probabilities in f64 with an `exp` made of IEEE basic operations only
/// (no `libm`), sorts with a total order (ties by token id) and sums in a fixed
/// order: the same logits and seed give the same token on Linux, Windows and macOS.
/// (The logits themselves may still differ in their last bits between platforms; a
/// sampled token changes only if that moves a cumulative probability across the
/// drawn number.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

impl Sampler {
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Self {
        Self {
            temperature,
            top_k,
            top_p,
        }
    }

    /// One token from `logits` (`[V]`). Always consumes exactly one draw of `rng`, so a
    /// row's stream stays aligned whatever the settings.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> Result<u32> {
        let u = rng.next_unit();
        let (order, w) = self.candidates(logits)?;
        let kept: f64 = w.iter().sum();
        let target = u * kept;
        let mut cum = 0.0;
        for (i, x) in w.iter().enumerate() {
            cum += x;
            if target < cum {
                return Ok(order[i] as u32);
            }
        }
        Ok(order[w.len() - 1] as u32)
    }

    /// The probability of every token of `logits` (`[V]`) under this sampler: what
    /// [`Sampler::sample`] draws from (0 for the tokens top-k and top-p removed).
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<f64>> {
        let (order, w) = self.candidates(logits)?;
        let kept: f64 = w.iter().sum();
        let mut p = vec![0.0; logits.len()];
        for (i, x) in order.iter().zip(&w) {
            p[*i] = x / kept;
        }
        Ok(p)
    }

    /// The tokens that may be drawn, best first, with their unnormalised probabilities
    /// `exp((x - max) / T)` after temperature, top-k and top-p. Temperature 0 (argmax)
    /// and all-`-inf` logits keep only the best token, with weight 1.
    fn candidates(&self, logits: &[f32]) -> Result<(Vec<usize>, Vec<f64>)> {
        if logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(non_finite("sampling"));
        }
        if logits.is_empty() {
            return Err(EngineError::Config(
                "sampling from an empty vocabulary".into(),
            ));
        }
        // Candidates best first; ties by token id (a total, platform-independent order).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
        if self.temperature <= 0.0 {
            return Ok((vec![order[0]], vec![1.0]));
        }
        let keep = self
            .top_k
            .map(|k| k.clamp(1, order.len()))
            .unwrap_or(order.len());
        order.truncate(keep);
        let t = self.temperature;
        let m = logits[order[0]] as f64 / t;
        if m == f64::NEG_INFINITY {
            return Ok((vec![order[0]], vec![1.0]));
        }
        let mut w: Vec<f64> = order
            .iter()
            .map(|i| pmath::exp(logits[*i] as f64 / t - m))
            .collect();
        let total: f64 = w.iter().sum();
        if let Some(top_p) = self.top_p {
            if top_p < 1.0 {
                // The smallest best-first set whose probability reaches top_p.
                let mut cum = 0.0;
                for (i, x) in w.iter().enumerate() {
                    cum += x;
                    if cum >= top_p * total {
                        w.truncate(i + 1);
                        order.truncate(i + 1);
                        break;
                    }
                }
            }
        }
        Ok((order, w))
    }
}

/// A finished hypothesis.
#[derive(Debug, Clone)]
struct Hyp {
    /// `sum_logprobs / len ^ length_penalty`
    score: f64,
    tokens: Vec<u32>,
}

/// What beam search is asked for, fixed for a whole generation (the strategy's
/// `num_beams`, `length_penalty`, `early_stopping` and the options' EOS and pad ids).
#[derive(Debug, Clone, Copy)]
pub(super) struct BeamSettings {
    /// `K`: running beams and kept hypotheses per input row.
    pub(super) beams: usize,
    pub(super) length_penalty: f64,
    pub(super) early_stopping: bool,
    pub(super) eos: Option<u32>,
    /// What done rows emit and short hypotheses are padded with.
    pub(super) pad: u32,
}

/// Beam search state over `B` input rows of `K` beams (running rows `b * K + j`).
#[derive(Debug, Clone)]
pub(super) struct Beams {
    batch: usize,
    set: BeamSettings,
    /// `[B * K]` cumulative log-probability of each running beam.
    scores: Vec<f64>,
    /// Per input row, best first, at most K.
    hyps: Vec<Vec<Hyp>>,
    /// Per input row.
    done: Vec<bool>,
}

impl Beams {
    pub(super) fn new(batch: usize, set: BeamSettings) -> Self {
        Self {
            batch,
            set,
            scores: vec![0.0; batch * set.beams],
            hyps: vec![vec![]; batch],
            done: vec![false; batch],
        }
    }

    /// `len ^ length_penalty` (1 for an empty sequence).
    fn penalty(&self, len: usize) -> f64 {
        if len == 0 {
            1.0
        } else {
            pmath::pow(len as f64, self.set.length_penalty)
        }
    }

    fn add(&mut self, row: usize, sum_logprobs: f64, tokens: Vec<u32>) {
        let score = sum_logprobs / self.penalty(tokens.len());
        let k = self.set.beams;
        if let Some(h) = self.hyps.get_mut(row) {
            h.push(Hyp { score, tokens });
            // Stable: an earlier hypothesis wins a tie.
            h.sort_by(|a, b| b.score.total_cmp(&a.score));
            h.truncate(k);
        }
    }

    fn is_done(&self, row: usize, best_running: f64, cur_len: usize) -> bool {
        let h = &self.hyps[row];
        if h.len() < self.set.beams {
            return false;
        }
        if self.set.early_stopping {
            return true;
        }
        let worst = h.last().map(|x| x.score).unwrap_or(f64::NEG_INFINITY);
        worst >= best_running / self.penalty(cur_len)
    }

    pub(super) fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// One step: `logprobs` `[B*K][V]` of the running beams, `hist` `[B*K][step]` their
    /// tokens so far. Returns the next token of every running row and the beam it
    /// continues (`[B*K]` each, indices into the previous rows). At the `last` step
    /// (the length limit) every one of the best K candidates finishes, EOS or not.
    pub(super) fn step(
        &mut self,
        logprobs: &[Vec<f64>],
        hist: &[Vec<u32>],
        step: usize,
        last: bool,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let k = self.set.beams;
        let n = self.batch * k;
        let mut tokens = vec![self.set.pad; n];
        let mut source: Vec<u32> = (0..n as u32).collect();
        let mut scores = self.scores.clone();
        for row in 0..self.batch {
            if self.done[row] {
                continue; // pad tokens, beams stay in place
            }
            // At the first step every beam of a row is the same prompt: expand beam 0.
            let live = if step == 0 { 1 } else { k };
            let mut cand: Vec<(f64, usize, usize)> = vec![];
            for j in 0..live {
                let i = row * k + j;
                let lp = logprobs.get(i).ok_or_else(|| {
                    EngineError::Config(format!("beam search: no logits for row {i}"))
                })?;
                cand.extend(
                    lp.iter()
                        .enumerate()
                        .map(|(t, x)| (self.scores[i] + x, j, t)),
                );
            }
            // Best first; ties by beam, then token id.
            cand.sort_by(|a, c| c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)).then(a.2.cmp(&c.2)));
            cand.truncate(2 * k);
            let mut next: Vec<(f64, usize, u32)> = Vec::with_capacity(k);
            for (rank, (score, j, t)) in cand.into_iter().enumerate() {
                let t = t as u32;
                let is_eos = Some(t) == self.set.eos;
                // Only a candidate among the best K finishes a hypothesis: one ending in
                // EOS, or any at the length limit.
                if rank < k && (is_eos || last) {
                    let mut toks = hist.get(row * k + j).cloned().unwrap_or_default();
                    toks.push(t);
                    self.add(row, score, toks);
                }
                if is_eos {
                    continue;
                }
                next.push((score, j, t));
                if next.len() == k {
                    break;
                }
            }
            if next.len() < k {
                return Err(EngineError::Config(format!(
                    "beam search: {k} beams need at least {} non-EOS candidates per row; the vocabulary is too small",
                    k
                )));
            }
            for (slot, (score, j, t)) in next.iter().enumerate() {
                let i = row * k + slot;
                scores[i] = *score;
                tokens[i] = *t;
                source[i] = (row * k + j) as u32;
            }
            self.done[row] = self.is_done(row, next[0].0, step + 1);
        }
        self.scores = scores;
        Ok((tokens, source))
    }

    /// The best `num_return` hypotheses of every input row, best first:
    /// `([B * num_return][len], [B * num_return])`, padded with `pad` to one length.
    /// Every row has its hypotheses by then: from EOS candidates or the last step.
    pub(super) fn finalize(&self, num_return: usize) -> (Vec<Vec<u32>>, Vec<f32>) {
        let mut tokens = vec![];
        let mut scores = vec![];
        for h in &self.hyps {
            for hyp in h.iter().take(num_return) {
                tokens.push(hyp.tokens.clone());
                scores.push(hyp.score as f32);
            }
        }
        let len = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        for t in &mut tokens {
            t.resize(len, self.set.pad);
        }
        (tokens, scores)
    }
}

/// `exp`, `ln` and `pow` from IEEE-754 basic operations only (add, subtract, multiply,
/// divide, exact rounding to an integer, exponent bit manipulation): no platform
/// `libm` call, so every platform computes the same bits. Accurate to a few ulp,
/// which is what sampling and beam scores need.
mod pmath {
    use std::f64::consts::{LOG2_E, SQRT_2};
    /// ln 2 split for Cody-Waite reduction (fdlibm's constants): the high part has
    /// trailing zero bits, so `k * LN2_HI` is exact for |k| < 2^11.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

    /// 2^k for k in [-1022, 1023].
    fn two_pow(k: i64) -> f64 {
        f64::from_bits(((k + 1023) as u64) << 52)
    }

    pub fn exp(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        if x > 709.0 {
            return f64::INFINITY;
        }
        if x < -708.0 {
            // Below the normal range; next to the largest term (1) it is nothing.
            return 0.0;
        }
        // x = k ln2 + r, |r| <= ln2 / 2 (Cody-Waite reduction).
        let k = (x * LOG2_E).round();
        let r = (x - k * LN2_HI) - k * LN2_LO;
        // Taylor series to r^15 / 15! (error < 1e-17 for |r| <= 0.35), Horner form.
        let mut p = 1.0;
        for i in (1..=15).rev() {
            p = 1.0 + p * r / i as f64;
        }
        p * two_pow(k as i64)
    }

    pub fn ln(x: f64) -> f64 {
        if x.is_nan() || x < 0.0 {
            return f64::NAN;
        }
        if x == 0.0 {
            return f64::NEG_INFINITY;
        }
        if x.is_infinite() {
            return x;
        }
        if x < f64::MIN_POSITIVE {
            // Subnormal: scale into the normal range first (2^54).
            return ln(x * 18_014_398_509_481_984.0) - 54.0 * (LN2_HI + LN2_LO);
        }
        let bits = x.to_bits();
        let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
        if m > SQRT_2 {
            m /= 2.0;
            e += 1;
        }
        // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172.
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let mut p = 0.0;
        for i in (0..=12).rev() {
            p = 1.0 / (2 * i + 1) as f64 + s2 * p;
        }
        let e = e as f64;
        e * LN2_HI + (e * LN2_LO + 2.0 * s * p)
    }

    /// x^y for x > 0 (exact for y = 0 and y = 1).
    pub fn pow(x: f64, y: f64) -> f64 {
        if y == 0.0 {
            1.0
        } else if y == 1.0 {
            x
        } else {
            exp(y * ln(x))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two beams, EOS 1, pad 0, no early stopping.
    fn settings(length_penalty: f64) -> BeamSettings {
        BeamSettings {
            beams: 2,
            length_penalty,
            early_stopping: false,
            eos: Some(1),
            pad: 0,
        }
    }

    /// The length penalty ranks finished hypotheses by `sum_logprobs / len ^ penalty`:
    /// a penalty of 2 prefers the longer of two hypotheses, 0 the likelier one, and at
    /// most `num_beams` are kept, best first.
    #[test]
    fn beam_hypotheses_are_ranked_with_the_length_penalty() {
        let mut b = Beams::new(1, settings(2.0));
        assert!((b.penalty(3) - 9.0).abs() < 1e-12);
        assert_eq!(b.penalty(0), 1.0);
        b.add(0, -3.0, vec![1]); // -3 / 1
        b.add(0, -6.0, vec![5, 6, 1]); // -6 / 9
        b.add(0, -60.0, vec![5, 6, 7, 1]); // -60 / 16: dropped (third of two)
        let tokens: Vec<usize> = b.hyps[0].iter().map(|h| h.tokens.len()).collect();
        assert_eq!(tokens, [3, 1]);
        assert!((b.hyps[0][0].score - (-6.0 / 9.0)).abs() < 1e-12);
        let mut b = Beams::new(1, settings(0.0));
        b.add(0, -3.0, vec![1]);
        b.add(0, -6.0, vec![5, 6, 1]);
        assert_eq!(b.hyps[0][0].tokens, [1], "no penalty: the likelier wins");
    }

    /// A row is done when it holds `num_beams` hypotheses and either `early_stopping`,
    /// or no running beam can beat the worst of them any more.
    #[test]
    fn a_beam_row_is_done_by_early_stopping_or_when_no_running_beam_can_win() {
        let mut b = Beams::new(1, settings(1.0));
        b.add(0, -2.0, vec![4, 1]); // -1.0
        assert!(!b.is_done(0, -100.0, 2), "one hypothesis of two");
        b.add(0, -4.0, vec![4, 4, 1]); // -4/3
                                       // worst = -4/3; best running -6 at length 4: -1.5 < -4/3 -> done.
        assert!(b.is_done(0, -6.0, 4));
        // best running -2 at length 4: -0.5 could still beat it -> not done.
        assert!(!b.is_done(0, -2.0, 4));
        let mut e = b.clone();
        e.set.early_stopping = true;
        assert!(
            e.is_done(0, -2.0, 4),
            "early stopping ends the row at num_beams hypotheses"
        );
    }

    /// At the first step only beam 0 is expanded, so a vocabulary with fewer than
    /// `num_beams` tokens besides EOS cannot fill the beams: an error that says so. One
    /// more token fills them.
    #[test]
    fn beams_a_vocabulary_cannot_fill_are_an_error() {
        // Two beams, EOS 1: vocabulary {0, 1} gives one non-EOS candidate.
        let mut b = Beams::new(1, settings(1.0));
        let err = b
            .step(
                &[vec![-0.5, -1.0], vec![-0.5, -1.0]],
                &[vec![], vec![]],
                0,
                false,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("the vocabulary is too small"),
            "{err}"
        );
        let mut b = Beams::new(1, settings(1.0));
        let three = vec![-0.5, -1.0, -2.0];
        let (tokens, source) = b
            .step(&[three.clone(), three], &[vec![], vec![]], 0, false)
            .unwrap();
        assert_eq!((tokens, source), (vec![0, 2], vec![0, 0]));
    }

    #[test]
    fn portable_exp_and_ln_match_std_to_a_few_ulp() {
        let mut x = -700.0;
        while x < 700.0 {
            let (a, b) = (pmath::exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-15, "exp({x}): {a} vs {b}");
            x += 0.37;
        }
        for x in [
            1e-310, 5e-324, 1e-300, 1e-10, 0.3, 1.0, 1.5, 2.0, 10.0, 256.0, 1e10, 1e300,
        ] {
            let (a, b) = (pmath::ln(x), x.ln());
            assert!(
                (a - b).abs() <= 1e-15 * b.abs().max(1.0),
                "ln({x}): {a} vs {b}"
            );
        }
        assert_eq!(pmath::exp(0.0), 1.0);
        assert_eq!(pmath::ln(1.0), 0.0);
        assert!((pmath::pow(7.0, 0.5) - 7f64.sqrt()).abs() < 1e-14);
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, f32::NEG_INFINITY]).unwrap();
        let s: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert!(log_softmax(&[1.0, f32::NAN]).is_err());
    }

    /// A NaN or a `+inf` logit is an error, not a draw: either alone is refused, for
    /// sampling and for the distribution; `-inf` (a masked token) is allowed.
    #[test]
    fn the_sampler_refuses_nan_and_positive_infinity_alone() {
        let s = Sampler::new(1.0, None, None);
        let mut rng = Rng::new(3);
        for bad in [f32::NAN, f32::INFINITY] {
            let logits = [0.5f32, bad, 1.0];
            assert!(s.sample(&logits, &mut rng).is_err(), "{bad}");
            assert!(s.distribution(&logits).is_err(), "{bad}");
        }
        let p = s.distribution(&[0.0, f32::NEG_INFINITY]).unwrap();
        assert_eq!(p, vec![1.0, 0.0]);
    }

    #[test]
    fn sampler_respects_top_k_top_p_and_temperature_zero() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.8];
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            assert_eq!(
                Sampler::new(0.0, None, None)
                    .sample(&logits, &mut rng)
                    .unwrap(),
                1
            );
            assert_eq!(
                Sampler::new(1.0, Some(1), None)
                    .sample(&logits, &mut rng)
                    .unwrap(),
                1
            );
            let t = Sampler::new(1.0, Some(3), None)
                .sample(&logits, &mut rng)
                .unwrap();
            assert!([1, 2, 4].contains(&t));
            let t = Sampler::new(1.0, None, Some(0.01))
                .sample(&logits, &mut rng)
                .unwrap();
            assert_eq!(t, 1);
        }
        // Roughly the softmax frequencies.
        let mut counts = [0usize; 5];
        let mut rng = Rng::new(9);
        for _ in 0..20_000 {
            counts[Sampler::new(1.0, None, None)
                .sample(&logits, &mut rng)
                .unwrap() as usize] += 1;
        }
        let lp = log_softmax(&logits).unwrap();
        for (c, l) in counts.iter().zip(&lp) {
            let f = *c as f64 / 20_000.0;
            assert!((f - l.exp()).abs() < 0.02, "{counts:?}");
        }
    }
}
