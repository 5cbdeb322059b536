//! Comparing two fingerprints ([`compare`], `prefix-harness compare A B`): cases
//! matched by id; statuses, diagnoses, shape traces and tokens equal exactly, losses
//! and logits summaries within a [`Tolerance`].

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{CaseFingerprint, EnvironmentInfo, Fingerprint, DEFAULT_ATOL, DEFAULT_RTOL};
use crate::harness::run::Status;

/// How far numbers may drift: `|a - b| <= atol + rtol * max(|a|, |b|)` (symmetric, so
/// that comparing A with B and B with A agree). NaN equals NaN, an infinity only
/// itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            rtol: DEFAULT_RTOL,
            atol: DEFAULT_ATOL,
        }
    }
}

impl Tolerance {
    pub fn close(&self, a: f64, b: f64) -> bool {
        self.close_at_scale(a, b, 0.0)
    }

    /// [`Tolerance::close`] with the relative part measured against at least `scale`:
    /// a sum is compared relative to (at least) its largest term, since cancellation
    /// can make the sum itself small while its rounding error stays that of its terms.
    pub fn close_at_scale(&self, a: f64, b: f64, scale: f64) -> bool {
        if a.is_nan() || b.is_nan() {
            return a.is_nan() && b.is_nan();
        }
        if a.is_infinite() || b.is_infinite() {
            return a == b;
        }
        (a - b).abs() <= self.allowed(a, b, scale)
    }

    fn allowed(&self, a: f64, b: f64, scale: f64) -> f64 {
        self.atol + self.rtol * a.abs().max(b.abs()).max(scale)
    }
}

/// One way in which a case differs between A and B.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Difference {
    Status {
        a: String,
        b: String,
    },
    Diagnosis {
        a: Option<String>,
        b: Option<String>,
    },
    /// The Python stack's verdicts (or versions) differ (`run --against peft`).
    Stack {
        a: Option<String>,
        b: Option<String>,
    },
    /// The shape traces differ: the first differing event (0-based), as written on
    /// each side (None: that side has fewer events).
    Trace {
        event: usize,
        a: Option<String>,
        b: Option<String>,
        a_events: usize,
        b_events: usize,
        a_digest: Option<String>,
        b_digest: Option<String>,
    },
    /// Generated tokens differ: the first differing row and position.
    Tokens {
        row: usize,
        position: usize,
        a: Option<Vec<u32>>,
        b: Option<Vec<u32>>,
    },
    /// A list of numbers has a different length (`losses`, `logits`).
    Length {
        what: String,
        a: usize,
        b: usize,
    },
    /// Numbers beyond tolerance: how many, and the worst (`logits[3].median`).
    Numbers {
        count: usize,
        worst: String,
        a: f64,
        b: f64,
        abs_diff: f64,
    },
}

impl Difference {
    pub fn kind(&self) -> &'static str {
        match self {
            Difference::Status { .. } => "status",
            Difference::Diagnosis { .. } => "diagnosis",
            Difference::Stack { .. } => "stack",
            Difference::Trace { .. } => "trace",
            Difference::Tokens { .. } => "tokens",
            Difference::Length { .. } => "length",
            Difference::Numbers { .. } => "numbers",
        }
    }
}

/// Everything that differs about one case present on both sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseDifference {
    pub id: String,
    pub differences: Vec<Difference>,
}

/// The result of [`compare`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// How the two sides are named in [`Comparison::render`] (default `A`, `B`).
    pub labels: [String; 2],
    /// Where the two sides were read from, if from files (shown above the table).
    pub files: [Option<String>; 2],
    pub environments: [EnvironmentInfo; 2],
    pub tool_versions: [String; 2],
    pub tolerance: Tolerance,
    /// Cases present on both sides and run on both (not skipped).
    pub compared: usize,
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
    /// Cases skipped on at least one side (`platforms:`): `(id, status A, status B)`;
    /// listed, not compared, and not a difference.
    pub skipped: Vec<(String, String, String)>,
    /// Cases expected to behave differently on the two sides (a per-platform
    /// expectation): `(id, expected A, expected B)`. Only their statuses are compared:
    /// each side must have met its own expectation.
    pub expected_to_differ: Vec<(String, String, String)>,
    pub cases: Vec<CaseDifference>,
    /// The largest differences among all numbers compared (within tolerance or not).
    pub max_abs_diff: f64,
    pub max_rel_diff: f64,
}

impl Comparison {
    /// Same cases, same statuses, shapes and tokens, numbers within tolerance.
    pub fn is_equivalent(&self) -> bool {
        self.only_in_a.is_empty() && self.only_in_b.is_empty() && self.cases.is_empty()
    }

    /// Name the sides in the rendering (short names: they head the columns).
    pub fn with_labels(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.labels = [a.into(), b.into()];
        self
    }

    /// Record which files the sides were read from (shown above the table as
    /// `A = path`).
    pub fn with_files(mut self, a: impl Into<String>, b: impl Into<String>) -> Self {
        self.files = [Some(a.into()), Some(b.into())];
        self
    }

    /// The difference of `id`, if it differs.
    pub fn case(&self, id: &str) -> Option<&CaseDifference> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// A readable report: the environments side by side, one block per differing
    /// case, the cases present on one side only, and a verdict.
    pub fn render(&self) -> String {
        let [la, lb] = &self.labels;
        let [ea, eb] = &self.environments;
        let features = |e: &EnvironmentInfo| {
            if e.cpu_features.is_empty() {
                "-".to_string()
            } else {
                e.cpu_features.join(" ")
            }
        };
        let rows: Vec<(&str, String, String)> = vec![
            ("os", ea.os.clone(), eb.os.clone()),
            ("arch", ea.arch.clone(), eb.arch.clone()),
            ("cpu features", features(ea), features(eb)),
            ("rustc", ea.rustc.clone(), eb.rustc.clone()),
            ("candle", ea.candle.clone(), eb.candle.clone()),
            ("threads", ea.threads.to_string(), eb.threads.to_string()),
            ("jobs", ea.jobs.to_string(), eb.jobs.to_string()),
            (
                "prefix-harness",
                self.tool_versions[0].clone(),
                self.tool_versions[1].clone(),
            ),
        ];
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows
            .iter()
            .map(|r| r.1.chars().count())
            .chain([la.chars().count()])
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        if let [Some(fa), Some(fb)] = &self.files {
            let _ = writeln!(out, "{la} = {fa}\n{lb} = {fb}\n");
        }
        let _ = writeln!(out, "  {:<w0$}  {:<w1$}  {}", "", la, lb);
        for (name, a, b) in &rows {
            let mark = if a == b { ' ' } else { '*' };
            let _ = writeln!(out, "{mark} {name:<w0$}  {a:<w1$}  {b}");
        }
        let _ = writeln!(
            out,
            "(* differs)  tolerance: rtol {:e}, atol {:e} for losses and logits; statuses, shapes and tokens exactly\n",
            self.tolerance.rtol, self.tolerance.atol
        );
        if !self.cases.is_empty() {
            let wid = self
                .cases
                .iter()
                .map(|c| c.id.chars().count())
                .max()
                .unwrap_or(0)
                .max(4);
            let _ = writeln!(out, "{:<wid$}  {:<9}  detail", "case", "differs");
            for c in &self.cases {
                for (i, d) in c.differences.iter().enumerate() {
                    let id = if i == 0 { c.id.as_str() } else { "" };
                    let (head, more) = self.detail(d);
                    let _ = writeln!(out, "{id:<wid$}  {:<9}  {head}", d.kind());
                    for line in more {
                        let _ = writeln!(out, "{:<wid$}  {:<9}    {line}", "", "");
                    }
                }
            }
            out.push('\n');
        }
        for (side, ids) in [(la, &self.only_in_a), (lb, &self.only_in_b)] {
            if !ids.is_empty() {
                let _ = writeln!(out, "only in {side} ({}):", ids.len());
                for id in ids {
                    let _ = writeln!(out, "  {id}");
                }
            }
        }
        // Cases listed with what each side had: its status, or what it expected.
        for (title, cases, verb) in [
            (
                "skipped on at least one side, not compared",
                &self.skipped,
                "",
            ),
            (
                "expected to differ (per-platform expectation), statuses compared only",
                &self.expected_to_differ,
                " expects",
            ),
        ] {
            if !cases.is_empty() {
                let _ = writeln!(out, "{title} ({}):", cases.len());
                for (id, a, b) in cases {
                    let _ = writeln!(out, "  {id}: {la}{verb} {a}, {lb}{verb} {b}");
                }
            }
        }
        let _ = writeln!(
            out,
            "{} cases compared: {} equivalent, {} differ; {} only in {la}, {} only in {lb}, {} skipped",
            self.compared,
            self.compared - self.cases.len(),
            self.cases.len(),
            self.only_in_a.len(),
            self.only_in_b.len(),
            self.skipped.len()
        );
        let _ = writeln!(
            out,
            "largest numeric difference: {:.2e} absolute, {:.2e} relative",
            self.max_abs_diff, self.max_rel_diff
        );
        let _ = writeln!(
            out,
            "{}",
            if self.is_equivalent() {
                "verdict: equivalent"
            } else {
                "verdict: DIFFERENT"
            }
        );
        out
    }

    /// First line and continuation lines of one difference.
    fn detail(&self, d: &Difference) -> (String, Vec<String>) {
        let [la, lb] = &self.labels;
        let w = la.chars().count().max(lb.chars().count());
        let side = |l: &str, v: String| format!("{l:<w$}: {v}");
        let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        match d {
            Difference::Status { a, b } => (format!("{la} {a}, {lb} {b}"), vec![]),
            Difference::Diagnosis { a, b } => (
                "the diagnoses differ".into(),
                vec![side(la, show(a)), side(lb, show(b))],
            ),
            Difference::Stack { a, b } => (
                "the Python stack's verdicts differ".into(),
                vec![side(la, show(a)), side(lb, show(b))],
            ),
            Difference::Trace {
                event,
                a,
                b,
                a_events,
                b_events,
                a_digest,
                b_digest,
            } => {
                let head = if a.is_none() && b.is_none() {
                    format!(
                        "trace digests differ ({} vs {}), no event lines to show",
                        show(a_digest),
                        show(b_digest)
                    )
                } else {
                    format!(
                        "first differing cache event: #{event} ({la} has {a_events} events, {lb} {b_events})"
                    )
                };
                let more = if a.is_none() && b.is_none() {
                    vec![]
                } else {
                    let end = |o: &Option<String>| {
                        o.clone().unwrap_or_else(|| "(no such event)".into())
                    };
                    vec![side(la, end(a)), side(lb, end(b))]
                };
                (head, more)
            }
            Difference::Tokens {
                row,
                position,
                a,
                b,
            } => {
                let ids = |o: &Option<Vec<u32>>| {
                    o.as_ref()
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_else(|| "(no such row)".into())
                };
                (
                    format!("row {row} differs from position {position}"),
                    vec![side(la, ids(a)), side(lb, ids(b))],
                )
            }
            Difference::Length { what, a, b } => {
                (format!("{what}: {la} has {a} values, {lb} {b}"), vec![])
            }
            Difference::Numbers {
                count,
                worst,
                a,
                b,
                abs_diff,
            } => (
                format!(
                    "{count} value(s) beyond tolerance; worst {worst}: {la} {a}, {lb} {b} (|diff| {abs_diff:.2e})"
                ),
                vec![],
            ),
        }
    }
}

/// Read two fingerprint files and compare them; the sides are labelled with the paths
/// as given (`/`-separated). Errors (unreadable or foreign files) name the file.
pub fn compare_files(a: &Path, b: &Path, tol: Tolerance) -> Result<Comparison, String> {
    let fa = Fingerprint::read(a)?;
    let fb = Fingerprint::read(b)?;
    let label = |p: &Path| p.to_string_lossy().replace('\\', "/");
    Ok(compare(&fa, &fb, tol).with_files(label(a), label(b)))
}

/// Compare two fingerprints case by case (matched by id; order is A's, then B's).
pub fn compare(a: &Fingerprint, b: &Fingerprint, tol: Tolerance) -> Comparison {
    let by_id_b: std::collections::HashMap<&str, &CaseFingerprint> =
        b.cases.iter().map(|c| (c.id.as_str(), c)).collect();
    let ids_a: std::collections::HashSet<&str> = a.cases.iter().map(|c| c.id.as_str()).collect();
    let mut cmp = Comparison {
        labels: ["A".into(), "B".into()],
        files: [None, None],
        environments: [a.environment.clone(), b.environment.clone()],
        tool_versions: [a.tool_version.clone(), b.tool_version.clone()],
        tolerance: tol,
        compared: 0,
        only_in_a: vec![],
        only_in_b: b
            .cases
            .iter()
            .filter(|c| !ids_a.contains(c.id.as_str()))
            .map(|c| c.id.clone())
            .collect(),
        skipped: vec![],
        expected_to_differ: vec![],
        cases: vec![],
        max_abs_diff: 0.0,
        max_rel_diff: 0.0,
    };
    let skip = Status::Skip.as_str();
    for ca in &a.cases {
        let Some(cb) = by_id_b.get(ca.id.as_str()) else {
            cmp.only_in_a.push(ca.id.clone());
            continue;
        };
        if ca.status == skip || cb.status == skip {
            cmp.skipped
                .push((ca.id.clone(), ca.status.clone(), cb.status.clone()));
            continue;
        }
        cmp.compared += 1;
        if ca.expected != cb.expected {
            cmp.expected_to_differ
                .push((ca.id.clone(), ca.expected.clone(), cb.expected.clone()));
            if ca.status != cb.status {
                cmp.cases.push(CaseDifference {
                    id: ca.id.clone(),
                    differences: vec![Difference::Status {
                        a: ca.status.clone(),
                        b: cb.status.clone(),
                    }],
                });
            }
            continue;
        }
        let diffs = compare_case(ca, cb, &tol, &mut cmp.max_abs_diff, &mut cmp.max_rel_diff);
        if !diffs.is_empty() {
            cmp.cases.push(CaseDifference {
                id: ca.id.clone(),
                differences: diffs,
            });
        }
    }
    cmp
}

fn compare_case(
    a: &CaseFingerprint,
    b: &CaseFingerprint,
    tol: &Tolerance,
    max_abs: &mut f64,
    max_rel: &mut f64,
) -> Vec<Difference> {
    let mut out = vec![];
    if a.status != b.status {
        out.push(Difference::Status {
            a: a.status.clone(),
            b: b.status.clone(),
        });
    }
    if a.diagnosis != b.diagnosis {
        out.push(Difference::Diagnosis {
            a: a.diagnosis.clone(),
            b: b.diagnosis.clone(),
        });
    }
    // Only when both runs went to a stack: an engine-only fingerprint compares with one
    // made with --against on the engine's side alone.
    if a.stack.is_some() && b.stack.is_some() && a.stack != b.stack {
        out.push(Difference::Stack {
            a: a.stack.clone(),
            b: b.stack.clone(),
        });
    }
    if a.trace_digest != b.trace_digest || a.trace != b.trace {
        let n = a.trace.len().max(b.trace.len());
        let event = (0..n)
            .find(|&i| a.trace.get(i) != b.trace.get(i))
            .unwrap_or(n);
        out.push(Difference::Trace {
            event,
            a: a.trace.get(event).cloned(),
            b: b.trace.get(event).cloned(),
            a_events: a.trace.len(),
            b_events: b.trace.len(),
            a_digest: a.trace_digest.clone(),
            b_digest: b.trace_digest.clone(),
        });
    }
    if a.tokens != b.tokens {
        let rows = a.tokens.len().max(b.tokens.len());
        let row = (0..rows)
            .find(|&r| a.tokens.get(r) != b.tokens.get(r))
            .unwrap_or(0);
        let (ra, rb) = (a.tokens.get(row), b.tokens.get(row));
        let position = match (ra, rb) {
            (Some(x), Some(y)) => x
                .iter()
                .zip(y)
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len())),
            _ => 0,
        };
        out.push(Difference::Tokens {
            row,
            position,
            a: ra.cloned(),
            b: rb.cloned(),
        });
    }
    for (what, len_a, len_b) in [
        ("losses", a.losses.len(), b.losses.len()),
        ("logits", a.logits.len(), b.logits.len()),
    ] {
        if len_a != len_b {
            out.push(Difference::Length {
                what: what.into(),
                a: len_a,
                b: len_b,
            });
        }
    }
    // Numbers: every pair (name, a, b, scale floor), the worst one beyond tolerance is
    // shown.
    let mut pairs: Vec<(String, f64, f64, f64)> = vec![];
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        pairs.push((format!("losses[{i}]"), *x, *y, 0.0));
    }
    for (i, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
        // The sum is compared relative to at least the largest logit of the step.
        let largest = [x.min, x.max, y.min, y.max]
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        for (name, p, q) in [
            ("min", x.min, y.min),
            ("q25", x.q25, y.q25),
            ("median", x.median, y.median),
            ("q75", x.q75, y.q75),
            ("max", x.max, y.max),
            ("sum", x.sum, y.sum),
        ] {
            let floor = if name == "sum" { largest } else { 0.0 };
            pairs.push((format!("logits[{i}].{name}"), p, q, floor));
        }
    }
    let mut beyond = 0;
    let mut worst: Option<(f64, String, f64, f64)> = None;
    for (name, x, y, floor) in pairs {
        let d = (x - y).abs();
        if d.is_finite() {
            *max_abs = max_abs.max(d);
            let scale = x.abs().max(y.abs());
            if scale > 0.0 {
                *max_rel = max_rel.max(d / scale);
            }
        }
        if !tol.close_at_scale(x, y, floor) {
            beyond += 1;
            // Excess over the allowed drift; non-finite mismatches rank first.
            let allowed = tol.allowed(x, y, floor);
            let excess = if d.is_finite() {
                d / allowed.max(f64::MIN_POSITIVE)
            } else {
                f64::INFINITY
            };
            if worst.as_ref().is_none_or(|w| excess > w.0) {
                worst = Some((excess, name, x, y));
            }
        }
    }
    if let Some((_, name, x, y)) = worst {
        out.push(Difference::Numbers {
            count: beyond,
            worst: name,
            a: x,
            b: y,
            abs_diff: (x - y).abs(),
        });
    }
    out
}
