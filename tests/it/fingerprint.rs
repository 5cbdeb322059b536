//! Fingerprints and `compare`: floats survive the file bit for bit, comparisons find
//! every kind of difference (and nothing else), a run's fingerprint does not depend on
//! how many cases run at once or how many threads candle uses, and an edited prefix
//! length is reported with its case and the first differing cache event.

use std::path::{Path, PathBuf};
use std::process::Command;

use prefix_harness::engine::rng::Rng;
use prefix_harness::harness::fingerprint::{
    compare, quote_floats, CaseFingerprint, Difference, EnvironmentInfo, Fingerprint, Tolerance,
    DEFAULT_ATOL, DEFAULT_RTOL, FORMAT,
};
use prefix_harness::harness::report::Environment;
use prefix_harness::harness::run::{self, CaseResult, LogitsSummary, RunOptions};
use prefix_harness::harness::scenario::{self, Case};

use crate::common::{blessing, harness as bin, repo, text};

/// Every case of the shipped scenario files under `dirs` whose id contains one of
/// `filters` (all cases when `filters` is empty).
fn cases(dirs: &[&str], filters: &[&str]) -> Vec<Case> {
    let paths: Vec<PathBuf> = dirs.iter().map(|d| repo(d)).collect();
    let files = scenario::discover(&paths).expect("scenario files");
    files
        .iter()
        .flat_map(|f| scenario::load(f).unwrap_or_else(|e| panic!("{e}")))
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.id.contains(f)))
        .collect()
}

/// The cases of the thread tests: every bug reproduction and its fixed twin (all
/// families, every diagnosis class), the trained GPT-2 example (a loss curve) and one
/// slice of the family x cache matrix (P 8, batch 3: every family in every mode).
fn thread_test_cases() -> Vec<Case> {
    let mut c = cases(&["scenarios/bugs"], &[]);
    c.extend(cases(&["scenarios/examples"], &["gpt2-causal-lm"]));
    c.extend(cases(&["scenarios/matrix"], &["P=8,B=3"]));
    c
}

fn run_cases(cases: &[Case], jobs: usize) -> Vec<CaseResult> {
    let opts = RunOptions {
        jobs,
        timeout: None,
        fail_fast: false,
        // The CLI default (8 GiB).
        max_memory: 8192 << 20,
    };
    run::run_all(cases, &opts, &|_| {})
}

fn env() -> EnvironmentInfo {
    EnvironmentInfo {
        os: "linux".into(),
        arch: "x86_64".into(),
        cpu_features: vec!["avx2".into()],
        rustc: "rustc 1.95.0".into(),
        candle: "0.11.1".into(),
        threads: 1,
        jobs: 1,
    }
}

fn summary(x: f64) -> LogitsSummary {
    LogitsSummary {
        min: x - 2.0,
        q25: x - 1.0,
        median: x,
        q75: x + 1.0,
        max: x + 2.0,
        sum: 100.0 * x,
    }
}

fn case(id: &str) -> CaseFingerprint {
    CaseFingerprint {
        id: id.into(),
        status: "pass".into(),
        expected: "pass".into(),
        diagnosis: None,
        trace_digest: Some("00000000000000aa".into()),
        trace: vec![
            "step 0 layer 0 self seed standard key -+1x4x8x16=1x4x8x16 value -+1x4x8x16=1x4x8x16 read -/- mask - pos 0..8".into(),
            "step 0 layer 0 self update standard key 1x4x8x16+1x4x5x16=1x4x13x16 value 1x4x8x16+1x4x5x16=1x4x13x16 read 1x4x13x16/1x4x13x16 mask 1x1x5x13 pos 8..13".into(),
        ],
        tokens: vec![vec![1, 2, 3], vec![4, 5, 6]],
        losses: vec![2.5, 2.0, 1.5],
        logits: vec![summary(0.5), summary(-0.25)],
        stack: None,
    }
}

fn fingerprint(cases: Vec<CaseFingerprint>) -> Fingerprint {
    Fingerprint {
        format: FORMAT,
        tool_version: "0.1.0".into(),
        environment: env(),
        cases,
    }
}

// ---------------------------------------------------------------------------------
// The file format.

/// Random finite f32 values (stored as f64, like losses and logits quantiles) and
/// random finite f64 values (like logits sums) read back with identical bits, and so
/// do -0.0, subnormals, extremes, NaN and the infinities.
#[test]
fn floats_round_trip_bit_for_bit() {
    let mut rng = Rng::new(8);
    let mut values: Vec<f64> = vec![
        0.0,
        -0.0,
        1.0,
        0.1,
        1.0 / 3.0,
        f32::MIN_POSITIVE as f64,
        f32::from_bits(1) as f64,
        f32::MAX as f64,
        f32::MIN as f64,
        f64::MIN_POSITIVE,
        f64::from_bits(1),
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    while values.len() < 40_000 {
        let bits = rng.next_u64();
        let x32 = f32::from_bits(bits as u32);
        if x32.is_finite() {
            values.push(x32 as f64);
        }
        let x64 = f64::from_bits(bits);
        if x64.is_finite() {
            values.push(x64);
        }
    }
    let mut c = case("floats");
    c.losses = values.clone();
    c.logits = values
        .chunks(6)
        .filter(|w| w.len() == 6)
        .map(|w| LogitsSummary {
            min: w[0],
            q25: w[1],
            median: w[2],
            q75: w[3],
            max: w[4],
            sum: w[5],
        })
        .collect();
    let fp = fingerprint(vec![c]);
    let text = fp.to_json();
    assert!(text.contains("\"NaN\"") && text.contains("\"-inf\""));
    let back = Fingerprint::from_json(&text).expect("reads back");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.cases[0].losses), bits(&values));
    let flat = |l: &[LogitsSummary]| -> Vec<u64> {
        l.iter()
            .flat_map(|s| [s.min, s.q25, s.median, s.q75, s.max, s.sum])
            .map(f64::to_bits)
            .collect()
    };
    assert_eq!(flat(&back.cases[0].logits), flat(&fp.cases[0].logits));
    // The text itself is exact for any correctly rounding reader, not only ours.
    for x in values.iter().filter(|x| x.is_finite()).take(5000) {
        let t = serde_json::to_string(x).unwrap();
        assert_eq!(t.parse::<f64>().unwrap().to_bits(), x.to_bits(), "{t}");
    }
    // Writing is deterministic: the same fingerprint gives the same bytes.
    assert_eq!(back.to_json(), text);
}

#[test]
fn quoting_floats_leaves_strings_and_integers_alone() {
    let json = r#"{"a": [1, -2, 3.5, -4e-7, 1E+30], "s": "x 1.5 \"2.5\" \\", "t": [0.0]}"#;
    assert_eq!(
        quote_floats(json),
        r#"{"a": [1, -2, "3.5", "-4e-7", "1E+30"], "s": "x 1.5 \"2.5\" \\", "t": ["0.0"]}"#
    );
    // A number at the very end of the text (no closing bracket after it).
    assert_eq!(quote_floats("2.5"), r#""2.5""#);
    assert_eq!(quote_floats("-3"), "-3");
}

#[test]
fn the_file_uses_slash_free_unix_text_and_reads_with_a_bom() {
    let fp = fingerprint(vec![case("a")]);
    let text = fp.to_json();
    assert!(!text.contains('\r'));
    assert!(text.ends_with("}\n"));
    let with_bom = format!("\u{feff}{}", text.replace('\n', "\r\n"));
    assert_eq!(Fingerprint::from_json(&with_bom).unwrap(), fp);
}

#[test]
fn a_newer_format_or_a_foreign_file_is_refused_with_a_reason() {
    let mut fp = fingerprint(vec![]);
    fp.format = FORMAT + 1;
    let err = Fingerprint::from_json(&fp.to_json()).unwrap_err();
    assert!(err.contains("newer"), "{err}");
    let err = Fingerprint::from_json("{\"summary\": {}}").unwrap_err();
    assert!(err.contains("missing field"), "{err}");
    let dir = std::env::temp_dir().join(format!("ph-fp-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("missing.json");
    let err = Fingerprint::read(&p).unwrap_err();
    assert!(err.contains("missing.json"), "{err}");
    let p = dir.join("fp.json");
    fingerprint(vec![case("x")]).write(&p).unwrap();
    assert_eq!(Fingerprint::read(&p).unwrap(), fingerprint(vec![case("x")]));
}

// ---------------------------------------------------------------------------------
// compare on hand-made fingerprints.

#[test]
fn identical_fingerprints_are_equivalent() {
    let a = fingerprint(vec![case("x"), case("y")]);
    let c = compare(&a, &a.clone(), Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert_eq!(c.compared, 2);
    assert_eq!(c.max_abs_diff, 0.0);
    assert!(c.render().contains("verdict: equivalent"));
}

#[test]
fn cases_on_one_side_only_are_named() {
    let a = fingerprint(vec![case("x"), case("only-a")]);
    let b = fingerprint(vec![case("only-b"), case("x")]);
    let c = compare(&a, &b, Tolerance::default());
    assert!(!c.is_equivalent());
    assert_eq!(c.only_in_a, ["only-a"]);
    assert_eq!(c.only_in_b, ["only-b"]);
    assert_eq!(c.compared, 1);
    let r = c.render();
    assert!(r.contains("only in A (1):\n  only-a"), "{r}");
    assert!(r.contains("only in B (1):\n  only-b"), "{r}");
}

#[test]
fn numbers_within_tolerance_agree_and_beyond_it_differ() {
    let tol = Tolerance::default();
    assert_eq!((tol.rtol, tol.atol), (DEFAULT_RTOL, DEFAULT_ATOL));
    let a = fingerprint(vec![case("x")]);
    // A relative drift of 1e-6 everywhere: far inside the tolerance.
    let mut b = a.clone();
    for v in &mut b.cases[0].losses {
        *v *= 1.0 + 1e-6;
    }
    b.cases[0].logits[1].sum *= 1.0 + 1e-6;
    let c = compare(&a, &b, tol);
    assert!(c.is_equivalent(), "{}", c.render());
    assert!(
        c.max_abs_diff > 0.0 && c.max_rel_diff > 5e-7 && c.max_rel_diff < 2e-6,
        "max abs {}, max rel {}",
        c.max_abs_diff,
        c.max_rel_diff
    );
    // One loss 1% off and one quantile 1e-3 off.
    b.cases[0].losses[2] *= 1.01;
    b.cases[0].logits[0].q75 += 1e-3;
    let c = compare(&a, &b, tol);
    assert!(!c.is_equivalent());
    let d = &c.case("x").expect("x differs").differences;
    assert_eq!(d.len(), 1, "{d:?}");
    match &d[0] {
        Difference::Numbers { count, worst, .. } => {
            assert_eq!(*count, 2);
            assert_eq!(worst, "losses[2]");
        }
        other => panic!("{other:?}"),
    }
    // A looser tolerance accepts both.
    let loose = Tolerance {
        rtol: 0.05,
        atol: 0.0,
    };
    assert!(compare(&a, &b, loose).is_equivalent());
    // Near zero the absolute tolerance decides.
    assert!(tol.close(0.0, 9e-6) && !tol.close(0.0, 2e-5));
    assert!(tol.close(f64::NAN, f64::NAN) && !tol.close(f64::NAN, 0.0));
    assert!(tol.close(f64::INFINITY, f64::INFINITY) && !tol.close(f64::INFINITY, f64::MAX));
    // Symmetric.
    assert_eq!(tol.close(1.0, 1.0001), tol.close(1.0001, 1.0));
    // A logits sum that cancelled to ~0 is judged against its largest term (here 2.5):
    // a drift of 1e-4 passes, a drift of 1e-3 does not.
    let near_zero_sum = |drift: f64| {
        let mut a = fingerprint(vec![case("s")]);
        a.cases[0].logits[0].sum = 3e-3;
        let mut b = a.clone();
        b.cases[0].logits[0].sum += drift;
        compare(&a, &b, tol).is_equivalent()
    };
    assert!(near_zero_sum(1e-4));
    assert!(!near_zero_sum(1e-3));
}

#[test]
fn tokens_status_and_diagnosis_must_match_exactly() {
    let a = fingerprint(vec![case("x")]);
    let mut b = a.clone();
    b.cases[0].tokens[1][2] = 7;
    b.cases[0].status = "fail".into();
    b.cases[0].diagnosis = Some("rank at layer 0 self key".into());
    let c = compare(&a, &b, Tolerance::default());
    let kinds: Vec<&str> = c.cases[0].differences.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, ["status", "diagnosis", "tokens"]);
    match &c.cases[0].differences[2] {
        Difference::Tokens { row, position, .. } => assert_eq!((*row, *position), (1, 2)),
        other => panic!("{other:?}"),
    }
    let r = c.render();
    assert!(r.contains("row 1 differs from position 2"), "{r}");
    assert!(r.contains("A pass, B fail"), "{r}");
    // The case id heads its first difference's row only.
    let row = |kind: &str| r.lines().find(|l| l.contains(kind)).unwrap_or_default();
    assert!(row("A pass, B fail").starts_with("x "), "{r}");
    assert!(row("row 1 differs").starts_with("      tokens"), "{r}");
}

#[test]
fn the_stacks_verdicts_are_compared_when_both_runs_went_to_a_stack() {
    let mut a = fingerprint(vec![case("x")]);
    let mut b = a.clone();
    b.cases[0].stack =
        Some("agree: 4 tokens per row; torch 2.15.0, transformers 5.24.0, peft 0.21.2".into());
    assert!(
        compare(&a, &b, Tolerance::default()).is_equivalent(),
        "engine-only vs --against"
    );
    a.cases[0].stack = Some(
        "stack-fails: rank at layer 0 self key; torch 2.5.1, transformers 4.46.3, peft 0.12.0"
            .into(),
    );
    let c = compare(&a, &b, Tolerance::default());
    let kinds: Vec<&str> = c.cases[0].differences.iter().map(|d| d.kind()).collect();
    assert_eq!(kinds, ["stack"]);
    let r = c.render();
    assert!(
        r.contains("the Python stack's verdicts differ") && r.contains("transformers 4.46.3"),
        "{r}"
    );
    let back = Fingerprint::from_json(&a.to_json()).unwrap();
    assert_eq!(
        back.cases[0].stack, a.cases[0].stack,
        "the stack side survives the file"
    );
}

#[test]
fn a_trace_difference_shows_the_first_differing_event() {
    let a = fingerprint(vec![case("x")]);
    let mut b = a.clone();
    b.cases[0].trace[1] = b.cases[0].trace[1].replace("1x4x13x16", "1x4x12x16");
    b.cases[0]
        .trace
        .push("step 1 layer 0 self update ...".into());
    b.cases[0].trace_digest = Some("00000000000000bb".into());
    let c = compare(&a, &b, Tolerance::default());
    match &c.cases[0].differences[0] {
        Difference::Trace {
            event,
            a,
            b,
            a_events,
            b_events,
            ..
        } => {
            assert_eq!((*event, *a_events, *b_events), (1, 2, 3));
            assert!(a.as_deref().unwrap().contains("1x4x13x16"));
            assert!(b.as_deref().unwrap().contains("1x4x12x16"));
        }
        other => panic!("{other:?}"),
    }
    let r = c
        .with_labels("linux", "windows")
        .with_files("ci/linux.json", "ci/windows.json")
        .render();
    assert!(
        r.starts_with("linux = ci/linux.json\nwindows = ci/windows.json\n"),
        "{r}"
    );
    assert!(r.contains("first differing cache event: #1"), "{r}");
    assert!(r.contains("linux  : step 0 layer 0 self update"), "{r}");
    assert!(r.contains("windows: step 0 layer 0 self update"), "{r}");
    assert!(r.contains("verdict: DIFFERENT"), "{r}");
}

#[test]
fn skipped_cases_are_listed_but_not_differences() {
    let a = fingerprint(vec![case("x"), case("win-only")]);
    let mut b = a.clone();
    b.cases[1].status = "skip".into();
    b.cases[1].tokens.clear();
    let c = compare(&a, &b, Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert_eq!(c.skipped.len(), 1);
    assert!(c.render().contains("win-only: A pass, B skip"));
}

/// A per-platform expectation (a bug that reproduces only on Windows): the two sides
/// are expected to differ, so only "each met its own expectation" is compared.
#[test]
fn cases_expected_to_differ_compare_only_their_statuses() {
    let a = fingerprint(vec![case("x"), case("windows-bug")]);
    let mut b = a.clone();
    let w = &mut b.cases[1];
    w.expected = "mask-width @ layer 0 self mask".into();
    w.diagnosis = Some("mask-width at layer 0 self mask".into());
    w.trace.truncate(1);
    w.tokens.clear();
    w.logits.clear();
    let c = compare(&a, &b, Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert_eq!(c.expected_to_differ.len(), 1);
    assert!(c
        .render()
        .contains("windows-bug: A expects pass, B expects mask-width @ layer 0 self mask"));
    // Not meeting its expectation on one side is still a difference.
    b.cases[1].status = "fail".into();
    let c = compare(&a, &b, Tolerance::default());
    assert!(!c.is_equivalent());
    assert_eq!(c.cases[0].differences[0].kind(), "status");
}

#[test]
fn environments_are_shown_side_by_side_with_differences_marked() {
    let a = fingerprint(vec![]);
    let mut b = a.clone();
    b.environment.os = "windows".into();
    b.environment.cpu_features = vec!["avx2".into(), "fma".into()];
    let r = compare(&a, &b, Tolerance::default()).render();
    let lines: Vec<&str> = r.lines().collect();
    assert!(lines[0].contains('A') && lines[0].contains('B'), "{r}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("* os") && l.contains("linux") && l.contains("windows")),
        "{r}"
    );
    assert!(lines.iter().any(|l| l.starts_with("* cpu features")), "{r}");
    assert!(lines.iter().any(|l| l.starts_with("  candle")), "{r}");
    assert!(r.contains("rtol 1e-4, atol 1e-5"), "{r}");
}

// ---------------------------------------------------------------------------------
// Real runs.

/// A fingerprint of a real run keeps what the report says about every case.
#[test]
fn a_real_fingerprint_holds_trace_tokens_losses_and_logits() {
    let mut all = cases(&["scenarios/examples"], &["gpt2-causal-lm"]);
    all.extend(cases(&["scenarios/bugs"], &["peft-2192-bloom"]));
    let results = run_cases(&all, 2);
    let fp = Fingerprint::from_results(&results, Environment::capture(2));
    let g = &fp.cases[0];
    assert_eq!(g.status, "pass");
    assert!(!g.losses.is_empty(), "the example trains");
    assert_eq!(g.tokens.len(), 3);
    assert_eq!(g.logits.len(), 8, "one summary per new token");
    assert!(!g.trace.is_empty() && g.trace[0].starts_with("step 0 layer 0 self seed"));
    let bug = &fp.cases[1];
    assert_eq!(bug.status, "pass");
    let d = bug.diagnosis.as_deref().unwrap();
    assert!(d.starts_with("rank at layer 0 self key"), "{d}");
    let back = Fingerprint::from_json(&fp.to_json()).unwrap();
    assert_eq!(back, fp);
}

/// Issue 8 acceptance: a run where one case's prefix length was edited compares as
/// different and names that case and the first differing trace event.
#[test]
fn an_edited_prefix_length_is_named_with_its_first_differing_event() {
    let path = repo("scenarios/bugs/peft-2192-fixed.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("virtual_tokens: 8"));
    let original = scenario::parse(&path, &text).unwrap();
    let edited = scenario::parse(
        &path,
        &text.replace("virtual_tokens: 8", "virtual_tokens: 7"),
    )
    .unwrap();
    let id = original[0].id.clone();
    let env = || Environment::capture(2);
    let a = Fingerprint::from_results(&run_cases(&original, 2), env());
    let b = Fingerprint::from_results(&run_cases(&edited, 2), env());
    let c = compare(&a, &b, Tolerance::default());
    assert!(!c.is_equivalent());
    assert_eq!(
        c.cases.len(),
        original.len(),
        "every case of the file changed"
    );
    let d = c.case(&id).expect("the edited case is named");
    let Difference::Trace { event, a, b, .. } = &d.differences[0] else {
        panic!("{:?}", d.differences)
    };
    assert_eq!(*event, 0, "the prefix seed is the first event");
    assert!(a.as_deref().unwrap().contains("x8x"), "{a:?}");
    assert!(b.as_deref().unwrap().contains("x7x"), "{b:?}");
    let r = c.render();
    assert!(
        r.contains(&id) && r.contains("first differing cache event: #0"),
        "{r}"
    );
    eprintln!("{r}");
}

/// Issue 8 acceptance, part 1: cases running one at a time or two at once (each case
/// on its own thread) give the same fingerprint: shapes, statuses and tokens exactly,
/// numbers within the default tolerance (measured: bit-identical).
#[test]
fn one_or_two_cases_at_a_time_give_the_same_fingerprint() {
    let cs = thread_test_cases();
    let a = Fingerprint::from_results(&run_cases(&cs, 1), Environment::capture(1));
    let b = Fingerprint::from_results(&run_cases(&cs, 2), Environment::capture(2));
    let c = compare(&a, &b, Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert_eq!(c.compared, cs.len());
    eprintln!(
        "jobs 1 vs 2: {} cases, largest difference {:e} abs, {:e} rel",
        c.compared, c.max_abs_diff, c.max_rel_diff
    );
}

const CHILD_OUT: &str = "PH_FINGERPRINT_CHILD_OUT";

/// Not a test on its own: the body of a child process started by
/// `candle_thread_count_does_not_change_the_fingerprint` (candle reads
/// `RAYON_NUM_THREADS`, and its thread pools are sized once per process).
#[test]
#[ignore = "helper: run in a child process by candle_thread_count_does_not_change_the_fingerprint"]
fn fingerprint_child_process() {
    let Some(out) = std::env::var_os(CHILD_OUT) else {
        return;
    };
    let cs = thread_test_cases();
    let fp = Fingerprint::from_results(&run_cases(&cs, 1), Environment::capture(1));
    fp.write(Path::new(&out)).expect("write the fingerprint");
}

/// Issue 8 acceptance, part 2: candle with 1 and with 2 threads (separate processes)
/// gives the same fingerprint.
#[test]
fn candle_thread_count_does_not_change_the_fingerprint() {
    let dir = std::env::temp_dir().join(format!("ph-fp-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The helper's name in this binary: its module path without the crate.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let child = format!("{module}::fingerprint_child_process");
    let mut fps = vec![];
    for threads in [1, 2] {
        let out = dir.join(format!("threads-{threads}.json"));
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                child.as_str(),
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_OUT, &out)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env_remove("CANDLE_NUM_THREADS")
            .status()
            .expect("the test binary runs");
        assert!(status.success(), "child with {threads} thread(s) failed");
        fps.push(Fingerprint::read(&out).unwrap());
    }
    assert_eq!(fps[0].environment.threads, 1);
    assert_eq!(fps[1].environment.threads, 2);
    let c = compare(&fps[0], &fps[1], Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert!(c.compared > 40);
    eprintln!(
        "candle threads 1 vs 2: {} cases, largest difference {:e} abs, {:e} rel",
        c.compared, c.max_abs_diff, c.max_rel_diff
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------
// The command line: `run --fingerprint FILE` and `compare A B [--rtol R] [--atol A]`.

fn stdout(o: &std::process::Output) -> String {
    text(&o.stdout)
}

/// Issue 8 acceptance through the binary: runs with candle on 1 and on 2 threads
/// compare as equivalent (exit 0); a run with one case's prefix length edited compares
/// as different (exit 1) and names the case and its first differing cache event; an
/// unreadable file is an input error (exit 2).
#[test]
fn cli_fingerprints_compare_across_thread_counts_and_catch_an_edit() {
    let dir = std::env::temp_dir().join(format!("ph-fp-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for side in ["orig", "edited"] {
        std::fs::create_dir_all(dir.join(side)).unwrap();
    }
    let text = std::fs::read_to_string(repo("scenarios/bugs/peft-2192-fixed.yaml")).unwrap();
    std::fs::write(dir.join("orig/s.yaml"), &text).unwrap();
    std::fs::write(
        dir.join("edited/s.yaml"),
        text.replace("virtual_tokens: 8", "virtual_tokens: 7"),
    )
    .unwrap();
    let bugs = repo("scenarios/bugs");
    let run = |what: &Path, threads: &str, jobs: &str, out: &str| {
        let o = bin()
            .arg("run")
            .arg(what)
            .args(["--jobs", jobs, "--fingerprint"])
            .arg(dir.join(out))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        dir.join(out)
    };
    let compare = |a: &Path, b: &Path, extra: &[&str]| {
        bin()
            .arg("compare")
            .arg(a)
            .arg(b)
            .args(extra)
            .output()
            .unwrap()
    };
    let t1 = run(&bugs, "1", "1", "t1.json");
    let t2 = run(&bugs, "2", "1", "t2.json");
    let o = compare(&t1, &t2, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("verdict: equivalent"));
    let o = compare(&t1, &t2, &["--rtol", "0", "--atol", "0"]);
    assert_eq!(o.status.code(), Some(0), "bit-identical: {}", stdout(&o));

    let a = run(&dir.join("orig"), "1", "2", "orig.json");
    let b = run(&dir.join("edited"), "1", "2", "edited.json");
    let o = compare(&a, &b, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("peft-2192-fixed[cache=dynamic]"), "{out}");
    assert!(out.contains("first differing cache event: #0"), "{out}");
    assert!(out.contains("verdict: DIFFERENT"), "{out}");

    let o = compare(&a, &dir.join("missing.json"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.json"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The golden fingerprint: every untrained shipped case (training amplifies rounding
/// across CPUs, see the README's known limitations), with its statuses, diagnoses,
/// trace digests, tokens and logits summaries, compared with the committed file within
/// `compare`'s default tolerances. Snapshots pin shapes and tokens; this pins the
/// numbers, so a change that moves logits while shapes stay put (an attention scale, a
/// norm epsilon) fails here. Trace lines are left out (the snapshots hold them).
/// Bless with `BLESS=1 cargo test --test it fingerprint::golden`, and say why in the commit.
#[test]
fn golden_fingerprint_of_the_untrained_shipped_scenarios() {
    const GOLDEN: &str = "tests/golden/untrained.fingerprint.json";
    let cases: Vec<Case> = cases(&["scenarios"], &[])
        .into_iter()
        .filter(|c| c.scenario.train.is_none())
        .collect();
    assert!(cases.len() > 150, "{} untrained cases", cases.len());
    let mut fp = Fingerprint::from_results(&run_cases(&cases, 2), Environment::capture(2));
    fp.environment = env();
    for c in &mut fp.cases {
        c.trace.clear();
    }
    let path = repo(GOLDEN);
    if blessing() {
        fp.write(&path).expect("write the golden fingerprint");
        return;
    }
    let golden = Fingerprint::read(&path).unwrap_or_else(|e| {
        panic!("{GOLDEN}: {e}; run `BLESS=1 cargo test --test it fingerprint::golden`")
    });
    let cmp = compare(&golden, &fp, Tolerance::default());
    assert!(
        cmp.is_equivalent(),
        "the untrained shipped cases moved away from {GOLDEN} (bless with BLESS=1 if intended):\n{}",
        cmp.render()
    );
}
