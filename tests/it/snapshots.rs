//! Scenario snapshots: every case of every scenario file under `scenarios/` runs, and
//! its outcome and shape trace are compared with `snapshots/<case>.snap` (insta).
//!
//! Files are discovered when the test runs: a new scenario file needs no code change,
//! only its snapshots. Review and accept changes with `cargo insta review` (or
//! `INSTA_UPDATE=always cargo test --test it snapshots::`, then read `git diff snapshots/`).
//! With `CI=true` a missing or changed snapshot fails and nothing is written. The test
//! also fails when a case does not meet its expectation, and when a snapshot written
//! by this test has no case any more (a removed or renamed case: delete the file).
//! Cases skipped on this platform (`platforms:`) are neither run nor compared.
//!
//! One snapshot per case, named after the case id (`grid[family=t5,cache=sliding/16,P=8,B=3]`
//! -> `grid__family-t5_cache-sliding-16_P-8_B-3`). A snapshot holds only what must be
//! identical on every platform: status, diagnosis class, place, shapes and hint, the
//! generated token ids of untrained cases, whether training lowered the loss, and the trace
//! condensed to one line per step, attention and operation, with the layers that
//! behave identically merged (`L0-1`; the order of events within a step is not
//! kept). Durations, logits and the messages of passing cases are left out. A trace
//! line reads:
//!
//! ```text
//!  1 L0-1 self  update k [1,4,13,16]+[1,4,1,16]->[1,4,14,16] v =k read [1,4,14,16] mask [1,1,1,14] pos 13..14
//! ```
//!
//! step 1, layers 0 and 1, self-attention, an update: the cache held keys `[1,4,13,16]`,
//! the model appended `[1,4,1,16]`, the cache then held `[1,4,14,16]` (`-`: nothing
//! stored, `none` mode); values had the same shapes as keys (`=k`); the attention read
//! keys and values `[1,4,14,16]` (standard layout) under a mask `[B,1,S,K]` of
//! `[1,1,1,14]`, for query positions 13..14. Shapes are in the layout of the cache
//! (`layout:` in the snapshot), reads always in the standard `[B, H, K, D]`. A
//! `rotating` cache adds its ring head after the event (`head 3`); `save` and `load`
//! lines show what was written to the cache file and what was read back.
//!
//! `SNAPSHOT_FILTER=substring` runs only the cases whose id contains it (and skips the
//! check for snapshots without a case).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prefix_harness::engine::diagnosis::Attention;
use prefix_harness::engine::trace::{CacheOp, Trace, TraceEvent};
use prefix_harness::harness::run::{run_isolated, CaseResult, Status};
use prefix_harness::harness::scenario::{discover, load, Case};
use serde::Serialize;

/// The snapshot folder, the crate's `snapshots/` (insta resolves a relative path against
/// this file's folder, `tests/it/`).
const SNAPSHOT_DIR: &str = "../../snapshots";

/// What a case's snapshot holds.
#[derive(Debug, Serialize)]
struct CaseSnapshot {
    id: String,
    scenario: String,
    status: &'static str,
    expected: String,
    /// Only for cases that did not pass (their message says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    diagnosis: Option<DiagnosisSnapshot>,
    /// `steps N, loss decreased` (or `did not decrease`), when the case trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    training: Option<String>,
    /// Generated ids, one line per batch row.
    tokens: Vec<String>,
    /// The layout of the self-attention cache (lines name another layout when theirs
    /// differs); None without a trace.
    layout: Option<String>,
    /// One line per step, attention and operation; see the module documentation.
    trace: Vec<String>,
}

#[derive(Debug, Serialize)]
struct DiagnosisSnapshot {
    class: String,
    place: String,
    /// None when the diagnosis names no shapes (e.g. `no-grad`).
    expected_shape: Option<String>,
    actual_shape: Option<String>,
    /// The likely cause the diagnosis names (pinned so that a hint deleted or replaced
    /// by other text is seen); left out when empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

/// A shape as `[1,4,13,16]`.
fn dims(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(","))
}

fn opt_dims(s: &Option<Vec<usize>>) -> String {
    s.as_deref().map(dims).unwrap_or_else(|| "-".into())
}

/// `before+written->after` for an update or a read, just the shape for a seed.
fn chain(
    op: CacheOp,
    before: &Option<Vec<usize>>,
    written: &Option<Vec<usize>>,
    after: &Option<Vec<usize>>,
) -> String {
    if op == CacheOp::Seed {
        return opt_dims(written);
    }
    let mut s = String::new();
    if let Some(b) = before {
        s += &dims(b);
    }
    if let Some(w) = written {
        s += "+";
        s += &dims(w);
    }
    s += "->";
    s += &opt_dims(after);
    s
}

/// The name serde gives a unit variant (`self`, `update`, ...): new variants need no
/// change here.
fn serde_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// One event without its step and layer.
fn event_text(e: &TraceEvent, layout: &str) -> String {
    let attention = serde_name(&e.attention);
    let op = serde_name(&e.op);
    let mut s = format!("{attention:<5} {op:<6}");
    if e.layout.name() != layout {
        s += &format!(" layout {}", e.layout);
    }
    let k = chain(
        e.op,
        &e.shapes.key_before,
        &e.shapes.key_written,
        &e.shapes.key_after,
    );
    let v = chain(
        e.op,
        &e.shapes.value_before,
        &e.shapes.value_written,
        &e.shapes.value_after,
    );
    s += &format!(" k {k} v {}", if v == k { "=k".to_string() } else { v });
    match (&e.key_read, &e.value_read) {
        (None, None) => {}
        (k, v) if k == v => s += &format!(" read {}", opt_dims(k)),
        (k, v) => s += &format!(" read k{} v{}", opt_dims(k), opt_dims(v)),
    }
    if let Some(m) = &e.mask {
        s += &format!(" mask {}", dims(m));
    }
    if let Some((a, b)) = e.positions {
        s += &format!(" pos {a}..{b}");
    }
    if let Some(h) = e.ring_head {
        s += &format!(" head {h}");
    }
    s
}

/// `0-1`, `0,2-3`: sorted layer numbers with consecutive runs merged.
fn layer_ranges(layers: &[usize]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The trace, one line per step and distinct event text (layers merged), in the order
/// the texts first occur within the step.
fn condense(trace: &Trace, layout: &str) -> Vec<String> {
    let mut lines = vec![];
    let mut steps: BTreeMap<usize, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    for e in &trace.events {
        let text = event_text(e, layout);
        let groups = steps.entry(e.step).or_default();
        match groups.iter_mut().find(|(t, _)| *t == text) {
            Some((_, layers)) => layers.push(e.layer),
            None => groups.push((text, vec![e.layer])),
        }
    }
    for (step, groups) in steps {
        for (text, mut layers) in groups {
            layers.sort_unstable();
            lines.push(format!("{step:>2} L{} {text}", layer_ranges(&layers)));
        }
    }
    lines
}

fn snapshot_of(r: &CaseResult) -> CaseSnapshot {
    let trace = r.trace.clone().unwrap_or_default();
    let layout = trace
        .events
        .iter()
        .find(|e| e.attention == Attention::SelfAttn)
        .map(|e| e.layout.to_string());
    CaseSnapshot {
        id: r.id.clone(),
        scenario: r.scenario.replace('\\', "/"),
        status: r.status.as_str(),
        expected: r.expected.clone(),
        message: match r.status {
            Status::Pass => None,
            _ => r.message.clone(),
        },
        diagnosis: r.diagnosis.as_ref().map(|d| DiagnosisSnapshot {
            class: d.class.as_str().to_string(),
            place: d.place(),
            expected_shape: (!d.expected_shape.is_empty()).then(|| dims(&d.expected_shape)),
            actual_shape: (!d.actual_shape.is_empty()).then(|| dims(&d.actual_shape)),
            hint: (!d.hint.is_empty()).then(|| d.hint.clone()),
        }),
        training: match (r.losses.first(), r.losses.last()) {
            (Some(&a), Some(&b)) => Some(format!(
                "steps {}, loss {}",
                r.losses.len(),
                if b < a {
                    "decreased"
                } else {
                    "did not decrease"
                }
            )),
            _ => None,
        },
        tokens: if r.losses.is_empty() {
            r.tokens
                .iter()
                .map(|row| row.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
                .collect()
        } else {
            // After training, greedy ids sit on near-ties that one ulp of rounding moves
            // (AdamW turns near-zero gradient noise into full steps), and with them the
            // length (EOS): only the row count. The JSON report has the ids.
            vec![format!(
                "{} rows (ids after training are not compared)",
                r.tokens.len()
            )]
        },
        trace: condense(&trace, layout.as_deref().unwrap_or("")),
        layout,
    }
}

/// The snapshot name of a case id: portable file names (no `/ \ : * ? " < > |`),
/// readable, and distinct for distinct ids in practice (checked below).
fn snapshot_name(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 4);
    for ch in id.chars() {
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => out.push(ch),
            '[' => out.push_str("__"),
            ']' => {}
            '=' | '/' => out.push('-'),
            ',' => out.push('_'),
            _ => out.push('~'),
        }
    }
    out
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every case of every scenario file, with `/`-separated paths relative to the crate.
fn all_cases() -> Vec<Case> {
    let root = manifest_dir();
    let files = discover(&[root.join("scenarios")]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!files.is_empty(), "no scenario files under scenarios/");
    let mut cases = vec![];
    for f in files {
        let mut loaded = load(&f).unwrap_or_else(|e| panic!("invalid scenario file: {e}"));
        let rel = f
            .strip_prefix(&root)
            .unwrap_or(&f)
            .to_string_lossy()
            .replace('\\', "/");
        for c in &mut loaded {
            c.file = rel.clone();
        }
        cases.extend(loaded);
    }
    cases
}

/// Per-case time limit: a case that hangs is reported instead of hanging `cargo test`.
const CASE_TIMEOUT: Duration = Duration::from_secs(300);

/// Run `cases` on a few threads (one case per thread at a time), each isolated (a
/// panic or a time-out becomes an `error` result); results in order.
fn run_parallel(cases: &[Case]) -> Vec<CaseResult> {
    let jobs = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 4);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<CaseResult>>> = Mutex::new(vec![None; cases.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let r = run_isolated(case, Some(CASE_TIMEOUT));
                results.lock().expect("results")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|r| r.expect("every case ran"))
        .collect()
}

/// Snapshot files written by this test (insta records the source file in the header).
fn our_snapshot_files(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".snap")?.to_string();
            let head = std::fs::read_to_string(e.path()).ok()?;
            // `tests/snapshots.rs` wrote the older files, `tests/it/snapshots.rs` the newer.
            let ours = head.lines().take(6).any(|l| {
                matches!(
                    l.trim(),
                    "source: tests/snapshots.rs" | "source: tests/it/snapshots.rs"
                )
            });
            ours.then_some(stem)
        })
        .collect()
}

#[test]
fn every_scenario_case_matches_its_snapshot() {
    // One candle thread per case, as the CLI does with several jobs: the cases already
    // run in parallel, and tiny tensors do not pay for threads (about 2x faster here).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let filter = std::env::var("SNAPSHOT_FILTER").ok();
    let mut cases = all_cases();
    if let Some(f) = &filter {
        cases.retain(|c| c.id.contains(f.as_str()));
    }

    // Names must stay distinct on case-insensitive file systems too.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for c in &cases {
        let name = snapshot_name(&c.id);
        if let Some(other) = seen.insert(name.to_lowercase(), c.id.clone()) {
            panic!(
                "cases `{other}` and `{}` map to the same snapshot name `{name}`: rename one",
                c.id
            );
        }
    }

    let results = run_parallel(&cases);
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(SNAPSHOT_DIR);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);

    let mut mismatched = vec![];
    let mut unmet = vec![];
    let mut skipped = BTreeSet::new();
    for r in &results {
        let name = snapshot_name(&r.id);
        match r.status {
            // Skipped here, run elsewhere: its snapshot belongs to that platform.
            Status::Skip => {
                skipped.insert(name);
                continue;
            }
            Status::Pass => {}
            _ => unmet.push(format!(
                "{} ({}): {}: {}",
                r.id,
                r.scenario,
                r.status.as_str(),
                r.message.as_deref().unwrap_or("")
            )),
        }
        let snap = snapshot_of(r);
        let outcome = settings.bind(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                insta::assert_yaml_snapshot!(name.as_str(), &snap)
            }))
        });
        if outcome.is_err() {
            mismatched.push(format!("{} -> snapshots/{name}.snap", r.id));
        }
    }

    // A snapshot without a case: the case was removed or renamed.
    let mut orphans = vec![];
    if filter.is_none() {
        let produced: BTreeSet<String> = results.iter().map(|r| snapshot_name(&r.id)).collect();
        for stem in our_snapshot_files(&manifest_dir().join("snapshots")) {
            if !produced.contains(&stem) && !skipped.contains(&stem) {
                orphans.push(format!("snapshots/{stem}.snap"));
            }
        }
    }

    let mut report = String::new();
    if !mismatched.is_empty() {
        report += &format!(
            "\n{} of {} case snapshots are missing or changed (review: `cargo insta review`; diffs above):\n  {}\n",
            mismatched.len(),
            results.len(),
            mismatched.join("\n  ")
        );
    }
    if !orphans.is_empty() {
        report += &format!(
            "\n{} snapshots have no scenario case any more (delete them):\n  {}\n",
            orphans.len(),
            orphans.join("\n  ")
        );
    }
    if !unmet.is_empty() {
        report += &format!(
            "\n{} cases did not meet their expectation:\n  {}\n",
            unmet.len(),
            unmet.join("\n  ")
        );
    }
    assert!(report.is_empty(), "{report}");
    eprintln!(
        "{} cases, {} snapshots compared, {} skipped on this platform",
        results.len(),
        results.len() - skipped.len(),
        skipped.len()
    );
}

#[test]
fn snapshot_names_are_portable_and_readable() {
    assert_eq!(
        snapshot_name("grid[family=t5,cache=sliding/16,P=8,B=3]"),
        "grid__family-t5_cache-sliding-16_P-8_B-3"
    );
    assert_eq!(snapshot_name("peft-2192-fixed"), "peft-2192-fixed");
    assert_eq!(snapshot_name("a b:c"), "a~b~c");
    assert_eq!(layer_ranges(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
}
