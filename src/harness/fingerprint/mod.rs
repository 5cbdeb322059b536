//! Fingerprints: what a run produced, per case, in a file that can be compared across
//! machines, operating systems and thread counts (`run --fingerprint FILE`,
//! `compare A B`).
//!
//! A fingerprint holds, per case: the status and diagnosis, the shape trace (its digest
//! and one condensed line per cache event, so that a comparison can show the first
//! event that differs), the generated token ids, the loss curve and the per-step logits
//! summaries; plus the environment block of the JSON report.
//!
//! [`compare`] matches cases by id. Statuses, diagnoses, shape traces and tokens must be
//! equal exactly; losses and logits summaries within a [`Tolerance`]. Cases skipped on
//! a side (`platforms:`) are listed, not compared; cases whose expectation differs
//! between the sides (a per-platform expectation) must each meet their own, nothing
//! more. Neither counts against equivalence.
//!
//! # Floats
//!
//! Every float is written as the shortest decimal that reads back to the same bits
//! (serde_json's `ryu` output), so the file round-trips exactly through any correctly
//! rounding reader (Rust's `str::parse`, Python's `json`). Non-finite values, which JSON
//! numbers cannot express, are written as the strings `"NaN"`, `"inf"` and `"-inf"`.
//! serde_json's own float parser is only exact with its `float_roundtrip` feature
//! (without it, about 18% of f32 values stored as f64 come back one ulp off), so
//! [`Fingerprint::from_json`] hands every float to `str::parse` instead (see
//! [`quote_floats`]): reading is exact whatever features serde_json was built with.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::trace::{Trace, TraceEvent};
use crate::harness::report::{self, Environment};
use crate::harness::run::{CaseResult, LogitsSummary};

mod compare;
pub use compare::{compare, compare_files, CaseDifference, Comparison, Difference, Tolerance};

/// Version of the fingerprint file format (bumped on incompatible changes).
pub const FORMAT: u32 = 1;

/// Default relative tolerance of [`compare`].
///
/// The numbers in a fingerprint are f32 computations (logits of tiny models, O(1)
/// to O(10)) summarised in f64. The same program on another CPU or OS takes other
/// SIMD kernels (AVX2/AVX-512/NEON), other FMA contractions and other reduction
/// orders: a handful of f32 ulps per value (f32 epsilon is 1.2e-7), and up to ~1e-6
/// after a few layers (our implementations against candle-transformers differ by
/// 1.6e-6 to 2.6e-6 on the same weights). 1e-4 leaves two orders of magnitude for
/// that drift and still catches any real change: a different prefix, mask or weight
/// moves logits by 1e-2 or more. The sum of a step's logits (batch x vocabulary
/// terms) is compared relative to at least the step's largest logit, since it can
/// cancel to near zero while keeping its terms' rounding differences.
///
/// Measured here (linux x86_64, AVX-512): 1 vs 2 cases at a time and candle on 1 vs 2
/// threads give bit-identical fingerprints (difference 0). Cross-OS drift cannot be
/// measured on one machine: the CI `compare` job reports the largest difference it
/// sees, and `--rtol/--atol` override these defaults.
pub const DEFAULT_RTOL: f64 = 1e-4;
/// Default absolute tolerance of [`compare`]: the floor for values near zero (a
/// quantile or a loss that happens to be ~0, where a relative test is meaningless).
/// 1e-5 is ten times the cross-implementation drift measured above.
pub const DEFAULT_ATOL: f64 = 1e-5;

/// Where a fingerprint was made: the environment block of the JSON report, read back.
pub type EnvironmentInfo = Environment;

/// A run's fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    pub tool_version: String,
    pub environment: EnvironmentInfo,
    pub cases: Vec<CaseFingerprint>,
}

/// What one case produced. Fields other than `id` and `status` may be missing (files
/// of older versions): `None` for an `Option`, else the field's `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFingerprint {
    pub id: String,
    /// `pass` | `fail` | `skip` | `error`.
    pub status: String,
    /// What the case was expected to do on the platform that ran it (`pass`, or
    /// `rank @ layer 0 self key`): cases whose expectations differ between two
    /// fingerprints (a per-platform expectation) are not compared beyond their status.
    #[serde(default)]
    pub expected: String,
    /// `CLASS at PLACE (expected [..], actual [..])` when the run ended in a diagnosis.
    pub diagnosis: Option<String>,
    /// Digest of the full shape trace (None when nothing ran).
    pub trace_digest: Option<String>,
    /// One line per cache event (see [`event_line`]), in order.
    #[serde(default)]
    pub trace: Vec<String>,
    /// Generated ids per batch row.
    #[serde(default)]
    pub tokens: Vec<Vec<u32>>,
    /// Training loss per step (f32 values, exact in f64).
    #[serde(default, with = "float_list")]
    pub losses: Vec<f64>,
    /// Next-token logits of every decoding step, summarised.
    #[serde(default, with = "logits_list")]
    pub logits: Vec<LogitsSummary>,
    /// With `run --against peft`: the stack's verdict and versions, one line
    /// (`stack-fails: rank at layer 0 self key (...); torch 2.5.1, transformers ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
}

impl CaseFingerprint {
    pub fn from_result(r: &CaseResult) -> Self {
        Self {
            id: r.id.clone(),
            status: r.status.as_str().to_string(),
            expected: r.expected.clone(),
            diagnosis: r.diagnosis.as_ref().map(|d| {
                let mut s = format!("{} at {}", d.class.as_str(), d.place());
                if !d.expected_shape.is_empty() || !d.actual_shape.is_empty() {
                    let _ = write!(
                        s,
                        " (expected {}, actual {})",
                        shape(&d.expected_shape),
                        shape(&d.actual_shape)
                    );
                }
                s
            }),
            trace_digest: r.trace_digest.clone(),
            trace: r.trace.as_ref().map(trace_lines).unwrap_or_default(),
            tokens: r.tokens.clone(),
            losses: r.losses.iter().map(|x| *x as f64).collect(),
            logits: r.logits.clone(),
            stack: r
                .stack
                .as_ref()
                .map(|o| format!("{}; {}", o.describe(), o.versions.describe())),
        }
    }
}

impl Fingerprint {
    /// The fingerprint of a run: cases in the order given.
    pub fn from_results(results: &[CaseResult], env: Environment) -> Self {
        Self {
            format: FORMAT,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            environment: env,
            cases: results.iter().map(CaseFingerprint::from_result).collect(),
        }
    }

    /// Pretty JSON, `\n` line endings, ending with a newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("fingerprint serialises") + "\n"
    }

    /// Read a fingerprint; floats are read exactly (see the module docs).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let fp: Fingerprint =
            serde_json::from_str(&quote_floats(text)).map_err(|e| e.to_string())?;
        if fp.format > FORMAT {
            return Err(format!(
                "fingerprint format {} is newer than this tool understands ({FORMAT}); update prefix-harness",
                fp.format
            ));
        }
        Ok(fp)
    }

    /// Write atomically (temporary file + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        report::write_atomic(path, &self.to_json())
    }

    /// Read a fingerprint file; errors name the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let shown = path.to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        Self::from_json(&text).map_err(|e| format!("{shown}: not a fingerprint file: {e}"))
    }
}

/// `[2, 4, 8, 16]` as `2x4x8x16` (`[]` for a scalar).
fn shape(s: &[usize]) -> String {
    if s.is_empty() {
        return "[]".into();
    }
    s.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
}

fn opt_shape(s: &Option<Vec<usize>>) -> String {
    s.as_deref().map(shape).unwrap_or_else(|| "-".into())
}

/// One cache event on one line, e.g.
/// `step 1 layer 0 self update standard key 2x4x13x16+2x4x1x16=2x4x14x16 value ... read 2x4x14x16/2x4x14x16 mask 2x1x1x14 pos 13..14`
/// (`-` where the event has no such tensor).
pub fn event_line(e: &TraceEvent) -> String {
    // The op's name as serialised (`seed`, `update`, `read`, ...).
    let op = serde_json::to_value(e.op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", e.op));
    let pos = e
        .positions
        .map(|(a, b)| format!("{a}..{b}"))
        .unwrap_or_else(|| "-".into());
    format!(
        "step {} layer {} {} {} {} key {}+{}={} value {}+{}={} read {}/{} mask {} pos {}",
        e.step,
        e.layer,
        e.attention,
        op,
        e.layout,
        opt_shape(&e.shapes.key_before),
        opt_shape(&e.shapes.key_written),
        opt_shape(&e.shapes.key_after),
        opt_shape(&e.shapes.value_before),
        opt_shape(&e.shapes.value_written),
        opt_shape(&e.shapes.value_after),
        opt_shape(&e.key_read),
        opt_shape(&e.value_read),
        opt_shape(&e.mask),
        pos
    )
}

/// Every event of a trace as a line ([`event_line`]).
pub fn trace_lines(t: &Trace) -> Vec<String> {
    t.events.iter().map(event_line).collect()
}

// ---------------------------------------------------------------------------------
// Exact floats in JSON.

/// A float in the file: a JSON number when finite, `"NaN"`/`"inf"`/`"-inf"` otherwise;
/// read from a number or from a string (what [`quote_floats`] makes of numbers).
#[derive(Debug, Clone, Copy)]
struct Num(f64);

impl Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        if x.is_finite() {
            s.serialize_f64(x)
        } else if x.is_nan() {
            s.serialize_str("NaN")
        } else if x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, or \"NaN\", \"inf\", \"-inf\"")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Num, E> {
                Ok(Num(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Num, E> {
                v.parse::<f64>()
                    .map(Num)
                    .map_err(|_| E::custom(format!("`{v}` is not a number")))
            }
        }
        d.deserialize_any(V)
    }
}

mod float_list {
    use super::Num;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter().map(|x| Num(*x)).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Num>::deserialize(d)?
            .into_iter()
            .map(|n| n.0)
            .collect())
    }
}

mod logits_list {
    use super::Num;
    use crate::harness::run::LogitsSummary;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Repr {
        min: Num,
        q25: Num,
        median: Num,
        q75: Num,
        max: Num,
        sum: Num,
    }

    pub fn serialize<S: Serializer>(v: &[LogitsSummary], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|l| Repr {
                min: Num(l.min),
                q25: Num(l.q25),
                median: Num(l.median),
                q75: Num(l.q75),
                max: Num(l.max),
                sum: Num(l.sum),
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<LogitsSummary>, D::Error> {
        Ok(Vec::<Repr>::deserialize(d)?
            .into_iter()
            .map(|r| LogitsSummary {
                min: r.min.0,
                q25: r.q25.0,
                median: r.median.0,
                q75: r.q75.0,
                max: r.max.0,
                sum: r.sum.0,
            })
            .collect())
    }
}

/// Turn every JSON number that has a fraction or an exponent into a JSON string with
/// the same text, leaving integers and the contents of strings alone, so that floats
/// reach `Num` as text and are parsed by `str::parse` (correctly rounded). Every
/// float field of a fingerprint is a `Num`; integers (token ids, counts) stay
/// numbers. Invalid JSON stays invalid (serde_json reports it).
pub fn quote_floats(json: &str) -> String {
    let b = json.as_bytes();
    let mut out = String::with_capacity(json.len() + json.len() / 8);
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Skip the string, honouring escapes.
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let tok = &json[start..i];
                if tok.contains(['.', 'e', 'E']) {
                    out.push_str(&json[copied..start]);
                    out.push('"');
                    out.push_str(tok);
                    out.push('"');
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&json[copied.min(json.len())..]);
    out
}
