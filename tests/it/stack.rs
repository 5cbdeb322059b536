//! `run --against peft` without a real Python stack: the verdict on real engine results
//! against hand-made stack results, and the driver runner against fake interpreters
//! that crash, hang, print garbage or are missing. The real stacks are exercised by
//! `.ci/run` (ci/stack/setup_venvs.sh, then `run scenarios/stack --against peft`).

mod verdict;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{assert_contains, exited, harness, read_json, TempDir};
use prefix_harness::engine::generate::Request;
use prefix_harness::engine::trace::CacheShapes;
use prefix_harness::harness::run::{run_case, CaseResult};
use prefix_harness::harness::scenario::{self, Case};
use prefix_harness::harness::stack::{
    run_job, verdict, Divergence, Job, JobCache, JobCase, JobGenerate, Phase, Phases, StackCase,
    StackEnv, StackError, StackEvent, StackOptions, VerdictKind, PROTOCOL,
};

fn case(file: &str) -> Case {
    scenario::load(Path::new(file)).unwrap().remove(0)
}

fn ok_stack(id: &str, tokens: Vec<Vec<u32>>) -> StackCase {
    StackCase {
        id: id.into(),
        status: "ok".into(),
        reason: None,
        duration_ms: 1.0,
        phases: Phases {
            recompute: Some(Phase {
                tokens: Some(tokens.clone()),
                ..Default::default()
            }),
            generate: Some(Phase {
                tokens: Some(tokens),
                ..Default::default()
            }),
            ..Default::default()
        },
        error: None,
    }
}

fn engine(c: &Case) -> CaseResult {
    let r = run_case(c);
    assert!(!r.tokens.is_empty(), "{:?}", r.message);
    r
}

#[test]
fn the_same_tokens_agree_and_the_first_other_token_is_named_by_row_and_step() {
    let c = case("scenarios/stack/peft-2192.yaml");
    let r = engine(&c);
    let env = StackEnv::default();
    let o = verdict(&c, &r, r.raised, &ok_stack(&c.id, r.tokens.clone()), &env);
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    let mut other = r.tokens.clone();
    other[1][2] = other[1][2].wrapping_add(1) % 256;
    let o = verdict(&c, &r, r.raised, &ok_stack(&c.id, other.clone()), &env);
    assert_eq!(
        (o.verdict, o.divergence),
        (VerdictKind::Diverges, Some(Divergence::Tokens))
    );
    assert!(o.detail.starts_with("row 1 step 2:"), "{}", o.detail);
    // The PEFT forward agrees, generate() does not: the stack against itself.
    let mut s = ok_stack(&c.id, r.tokens.clone());
    s.phases.generate.as_mut().unwrap().tokens = Some(other);
    let o = verdict(&c, &r, r.raised, &s, &env);
    assert_eq!(o.divergence, Some(Divergence::Generate), "{}", o.detail);
    // Decoding from PEFT's cache (the prompt in chunks when the case says so) is
    // compared with the engine's tokens too.
    let mut s = ok_stack(&c.id, r.tokens.clone());
    let mut cached = r.tokens.clone();
    cached[0][1] = cached[0][1].wrapping_add(1) % 256;
    s.phases.cached = Some(Phase {
        tokens: Some(cached),
        ..Default::default()
    });
    let o = verdict(&c, &r, r.raised, &s, &env);
    assert_eq!(o.divergence, Some(Divergence::Tokens), "{}", o.detail);
    assert!(
        o.detail.starts_with("row 0 step 1: engine token")
            && o.detail.contains("decoding from PEFT's cache"),
        "{}",
        o.detail
    );
    s.phases.cached.as_mut().unwrap().tokens = Some(r.tokens.clone());
    let o = verdict(&c, &r, r.raised, &s, &env);
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
}

#[test]
fn logits_beyond_tolerance_diverge_and_within_it_agree() {
    let c = case("scenarios/stack/peft-2192.yaml");
    let r = engine(&c);
    // A [1, 5] table whose order statistics are exactly the engine's summary.
    let l = &r.logits[0];
    let row = vec![l.min, l.q25, l.median, l.q75, l.max];
    let mut s = ok_stack(&c.id, r.tokens.clone());
    s.phases.forward = Some(Phase {
        logits_last: Some(vec![row.clone()]),
        ..Default::default()
    });
    let o = verdict(&c, &r, r.raised, &s, &StackEnv::default());
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert_eq!(o.logits_max_diff, Some(0.0));
    let mut moved = row;
    moved[2] += 1e-2;
    s.phases.forward.as_mut().unwrap().logits_last = Some(vec![moved]);
    let o = verdict(&c, &r, r.raised, &s, &StackEnv::default());
    assert_eq!(o.divergence, Some(Divergence::Logits), "{}", o.detail);
}

fn failed_2192() -> StackCase {
    let mut s = ok_stack("x", vec![]);
    s.phases.forward = Some(Phase {
        error: Some(StackError {
            kind: "RuntimeError".into(),
            message: "Tensors must have same number of dimensions: got 3 and 4".into(),
            file: Some("transformers/cache_utils.py".into()),
            line: Some(447),
            function: Some("update".into()),
        }),
        events: vec![StackEvent {
            step: 0,
            layer: 0,
            attention: "self".into(),
            op: "update".into(),
            shapes: CacheShapes {
                key_before: Some(vec![8, 8, 8]),
                value_before: Some(vec![8, 8, 8]),
                key_written: Some(vec![2, 4, 5, 8]),
                value_written: Some(vec![2, 4, 5, 8]),
                ..CacheShapes::default()
            },
            failed: true,
        }],
        ..Default::default()
    });
    s
}

#[test]
fn the_stacks_2192_failure_is_the_engines_rank_diagnosis() {
    // The engine with the fixed layout runs: the stack fails alone.
    let fixed = case("scenarios/stack/peft-2192.yaml");
    let r = engine(&fixed);
    let o = verdict(&fixed, &r, r.raised, &failed_2192(), &StackEnv::default());
    assert_eq!(o.verdict, VerdictKind::StackFails, "{}", o.detail);
    let d = o.diagnosis.unwrap();
    assert_eq!(d.class.as_str(), "rank");
    assert_eq!(d.place(), "layer 0 self key");
    // The engine's historical switch fails the same way: both fail alike.
    let buggy = case("scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml");
    let r = run_case(&buggy);
    assert!(r.raised);
    let o = verdict(&buggy, &r, r.raised, &failed_2192(), &StackEnv::default());
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert!(
        o.detail.starts_with("both fail: rank at layer 0 self key"),
        "{}",
        o.detail
    );
    // The engine fails, the stack runs.
    let o = verdict(
        &buggy,
        &r,
        r.raised,
        &ok_stack(&buggy.id, vec![]),
        &StackEnv::default(),
    );
    assert_eq!(o.verdict, VerdictKind::EngineFails, "{}", o.detail);
}

#[test]
fn a_skipped_or_broken_stack_case_is_skip_or_error_with_its_reason() {
    let c = case("scenarios/stack/peft-2192.yaml");
    let r = engine(&c);
    let mut s = StackCase::failed(&c.id, "no torch".into());
    let o = verdict(&c, &r, false, &s, &StackEnv::default());
    assert_eq!(
        (o.verdict, o.detail.as_str()),
        (VerdictKind::Error, "no torch")
    );
    s.status = "skip".into();
    s.reason = Some("transformers 5 has no tuple caches".into());
    let o = verdict(&c, &r, false, &s, &StackEnv::default());
    assert_eq!(o.verdict, VerdictKind::Skip);
    assert_eq!(o.detail, "transformers 5 has no tuple caches");
}

// ---------------------------------------------------------------------------------
// The driver runner against fake interpreters

fn job(ids: &[&str]) -> Job {
    Job {
        protocol: PROTOCOL,
        cases: ids
            .iter()
            .map(|id| JobCase {
                id: id.to_string(),
                model_dir: "/nonexistent/model".into(),
                adapter_dir: "/nonexistent/adapter".into(),
                encoder_decoder: false,
                cache: JobCache {
                    mode: "dynamic",
                    max_len: None,
                    window: None,
                },
                input_ids: vec![vec![1, 2]],
                attention_mask: vec![vec![1, 1]],
                decoder_start_token_id: 0,
                generate: JobGenerate {
                    request: Request::greedy(2),
                    prefill_chunk: None,
                },
                train: None,
                timeout_s: 1.0,
            })
            .collect(),
    }
}

/// A fake interpreter: a shell script that runs `body` with the job file as `$2`. It
/// answers each case by its id: `hang` sleeps, `crash` exits 1, `garbage` prints a
/// line that is not JSON, anything else is `ok` with tokens `[[7, 8]]`.
fn fake_python(dir: &Path) -> PathBuf {
    let p = dir.join("fake-python");
    let script = r#"#!/bin/sh
job="$2"
echo '{"environment": {"python": "3.0", "torch": "0", "transformers": "4.46.3", "peft": "0.12.0"}}'
for id in $(grep -o '"id":"[^"]*"' "$job" | sed 's/"id":"\(.*\)"/\1/'); do
  case "$id" in
    hang*) sleep 30 ;;
    crash*) echo "Fatal Python error: Segmentation fault" >&2; exit 1 ;;
    garbage*) echo "this is not JSON" ;;
    *) echo "{\"id\": \"$id\", \"status\": \"ok\", \"phases\": {\"recompute\": {\"tokens\": [[7, 8]]}}}" ;;
  esac
done
"#;
    std::fs::write(&p, script).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    p
}

/// `prefix-harness CMD SCENARIO --against peft --python <none>` (and `--report REPORT`):
/// the command line with an interpreter that does not exist.
fn without_python(d: &Path, cmd: &str, scenario: &str, report: Option<&Path>) -> Output {
    let mut c = harness();
    c.args([cmd, scenario, "--against", "peft", "--python"])
        .arg(d.join("no-such-python"));
    if let Some(r) = report {
        c.arg("--report").arg(r);
    }
    c.output().expect("the binary runs")
}

/// `run SCENARIO --against peft` with no interpreter, which must exit with `code`: its
/// stdout and its JSON report.
fn run_without_python(scenario: &str, code: i32) -> (String, serde_json::Value) {
    let d = TempDir::new("stack-run");
    let report = d.join("r.json");
    let (stdout, _) = exited(&without_python(&d, "run", scenario, Some(&report)), code);
    (stdout, read_json(&report))
}

fn opts(python: PathBuf) -> StackOptions {
    StackOptions {
        python,
        timeout: Some(Duration::from_secs(1)),
        startup: Duration::from_secs(3),
    }
}

fn statuses(out: &[StackCase]) -> Vec<(String, String)> {
    out.iter()
        .map(|c| (c.id.clone(), c.status.clone()))
        .collect()
}

#[test]
fn a_missing_interpreter_is_an_error_for_every_case_naming_it() {
    let d = TempDir::new("stack-missing");
    let out = run_job(&job(&["a", "b"]), &d, &opts(d.join("no-such-python")));
    assert_eq!(out.cases.len(), 2);
    for c in &out.cases {
        assert_eq!(c.status, "error");
        let why = c.reason.as_deref().unwrap();
        assert!(
            why.contains("cannot start the Python interpreter") && why.contains("--python"),
            "{why}"
        );
    }
}

#[cfg(unix)]
#[test]
fn a_hang_is_killed_at_the_time_limit_and_the_remaining_cases_still_run() {
    let d = TempDir::new("stack-hang");
    let start = Instant::now();
    let out = run_job(&job(&["a", "hang", "b"]), &d, &opts(fake_python(&d)));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        statuses(&out.cases),
        [("a", "ok"), ("hang", "error"), ("b", "ok")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let why = out.cases[1].reason.as_deref().unwrap();
    assert!(why.contains("timed out after 1 s"), "{why}");
    assert_eq!(out.env.unwrap().transformers.as_deref(), Some("4.46.3"));
    assert_eq!(
        out.cases[2].phases.recompute.as_ref().unwrap().tokens,
        Some(vec![vec![7, 8]])
    );
}

#[cfg(unix)]
#[test]
fn a_crash_and_garbage_are_errors_with_the_reason_and_the_rest_still_run() {
    let d = TempDir::new("stack-crash");
    let out = run_job(
        &job(&["crash", "a", "garbage", "b"]),
        &d,
        &opts(fake_python(&d)),
    );
    assert_eq!(
        statuses(&out.cases),
        [
            ("crash", "error"),
            ("a", "ok"),
            ("garbage", "error"),
            ("b", "ok")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let crash = out.cases[0].reason.as_deref().unwrap();
    assert!(
        crash.contains("exit status 1") && crash.contains("Segmentation fault"),
        "{crash}"
    );
    let garbage = out.cases[2].reason.as_deref().unwrap();
    assert!(
        garbage.contains("not JSON") && garbage.contains("this is not JSON"),
        "{garbage}"
    );
}

#[test]
fn without_a_python_the_cli_reports_stack_errors_and_keeps_the_engine_results() {
    let (stdout, v) = run_without_python("scenarios/stack/peft-2192.yaml", 1);
    assert_contains(&stdout, "stack error: cannot start the Python interpreter");
    let c = &v["cases"][0];
    assert_eq!(c["status"], "error");
    assert_eq!(c["stack"]["verdict"], "error");
    assert!(
        !c["tokens"].as_array().unwrap().is_empty(),
        "the engine's tokens are kept: {c}"
    );
}

#[test]
fn quantized_cases_are_skipped_before_the_driver_with_the_reason() {
    // No interpreter: had a case reached the driver, it would be a stack error.
    let (_, v) = run_without_python("scenarios/cache/quantized.yaml", 0);
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        assert_eq!(c["status"], "pass", "{c}");
        assert_eq!(c["stack"]["verdict"], "skip", "{c}");
        let detail = c["stack"]["detail"].as_str().unwrap();
        assert!(detail.starts_with("cache mode quantized:"), "{detail}");
        assert!(c["quantization"]["token_agreement"].is_number(), "{c}");
    }
}

#[test]
fn repro_against_the_stack_reports_its_side_in_the_markdown() {
    let d = TempDir::new("stack-repro");
    let out = without_python(&d, "repro", "scenarios/stack/peft-2192.yaml", None);
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("### On the Python stack"), "{md}");
    assert!(
        md.contains("**error**: cannot start the Python interpreter"),
        "{md}"
    );
    assert!(
        md.contains("Generated ids:"),
        "the engine's side stays: {md}"
    );
}
