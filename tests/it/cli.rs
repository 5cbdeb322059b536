//! The command line as a user meets it: exit codes, errors that name file, line and
//! field, shards that partition the cases, and reports that parse.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prefix-harness"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env("CI", "true")
        .output()
        .expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh folder under the system temp dir for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("prefix-harness-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

const BASE: &str = "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ngenerate:\n  max_new_tokens: 2\n";

#[test]
fn a_typo_in_a_key_exits_2_naming_file_line_field_and_suggestion() {
    let d = scratch("typo");
    let f = write(
        &d,
        "typo.yaml",
        &BASE.replace("virtual_tokens", "virtual_token"),
    );
    let out = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("typo.yaml:5:3"), "{err}");
    assert!(err.contains("prefix.virtual_token"), "{err}");
    assert!(err.contains("did you mean `virtual_tokens`?"), "{err}");
}

#[test]
fn a_wrong_type_exits_2_naming_the_field() {
    let d = scratch("type");
    let f = write(&d, "t.yaml", &format!("{BASE}data:\n  batch_size: three\n"));
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("t.yaml:9:"), "{err}");
    assert!(
        err.contains("data.batch_size") && err.contains("three"),
        "{err}"
    );
}

#[test]
fn a_negative_size_exits_2_naming_the_field() {
    let d = scratch("neg");
    let f = write(
        &d,
        "n.yaml",
        &BASE.replace("virtual_tokens: 2", "virtual_tokens: -2"),
    );
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("n.yaml:5:") && err.contains("prefix.virtual_tokens"),
        "{err}"
    );
}

#[test]
fn zero_virtual_tokens_is_invalid_input() {
    let d = scratch("zero");
    let f = write(
        &d,
        "z.yaml",
        &BASE.replace("virtual_tokens: 2", "virtual_tokens: 0"),
    );
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("z.yaml:5: field `prefix.virtual_tokens`: expected at least 1")
    );
}

#[test]
fn an_expected_failure_that_does_not_happen_fails_the_run() {
    let d = scratch("fixed");
    let f = write(
        &d,
        "f.yaml",
        &format!("{BASE}expect: {{error: rank, layer: 0}}\n"),
    );
    let out = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(table.contains("demo") && table.contains("fail"), "{table}");
    assert!(table.contains("fixed? update the scenario"), "{table}");
    assert!(
        table.ends_with("0 passed, 1 failed, 0 skipped\n"),
        "{table}"
    );
}

#[test]
fn the_peft_2192_reproduction_passes_as_an_expected_rank_failure() {
    let out = run(&["run", "scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let table = text(&out.stdout);
    assert!(table.contains("rank at layer 0 self key"), "{table}");
}

#[test]
fn cases_for_another_platform_are_skipped_with_the_reason() {
    let other = if cfg!(windows) { "linux" } else { "windows" };
    let d = scratch("platform");
    let f = write(&d, "p.yaml", &format!("{BASE}platforms: [{other}]\n"));
    let out = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out.stdout);
    assert!(
        table.contains("skip") && table.contains("meant for"),
        "{table}"
    );
}

fn ids_of_report(path: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn three_shards_cover_every_case_exactly_once() {
    let d = scratch("shards");
    let listed = text(&run(&["list", "scenarios"]).stdout);
    let mut all: Vec<String> = listed.lines().map(str::to_string).collect();
    let mut seen = vec![];
    for i in 1..=3 {
        let rep = d.join(format!("shard{i}.json"));
        let out = run(&[
            "run",
            "scenarios",
            "--shard",
            &format!("{i}/3"),
            "--report",
            rep.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
        seen.extend(ids_of_report(&rep));
    }
    all.sort();
    seen.sort();
    assert!(!all.is_empty());
    assert_eq!(seen, all);
}

#[test]
fn json_and_junit_reports_carry_every_case() {
    let d = scratch("reports");
    let (json, xml) = (d.join("r.json"), d.join("r.xml"));
    let out = run(&[
        "run",
        "scenarios/bugs",
        "--report",
        json.to_str().unwrap(),
        "--junit",
        xml.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in ["tool_version", "environment", "cases"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for k in ["os", "arch", "cpu_features", "rustc", "candle", "threads"] {
        assert!(v["environment"].get(k).is_some(), "missing environment.{k}");
    }
    let cases = v["cases"].as_array().unwrap();
    let listed = text(&run(&["list", "scenarios/bugs"]).stdout)
        .lines()
        .count();
    assert!(listed > 0);
    assert_eq!(cases.len(), listed);
    for c in cases {
        for k in [
            "id",
            "scenario",
            "status",
            "expected",
            "duration_ms",
            "diagnosis",
            "losses",
            "tokens",
            "trace_digest",
        ] {
            assert!(c.get(k).is_some(), "case without {k}: {c}");
        }
    }
    let bug = cases
        .iter()
        .find(|c| c["id"] == "peft-2192-bloom-legacy-prefix")
        .unwrap();
    assert_eq!(bug["diagnosis"]["class"], "rank");
    assert_eq!(
        bug["diagnosis"]["actual_shape"].as_array().unwrap().len(),
        3
    );
    let xml_text = std::fs::read_to_string(&xml).unwrap();
    let doc = roxmltree::Document::parse(&xml_text).expect("JUnit XML parses");
    let testcases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(testcases.len(), listed);
}

#[test]
fn an_unwritable_report_path_does_not_leave_a_partial_file() {
    let d = scratch("atomic");
    let target = d.join("keep.json");
    std::fs::write(&target, "previous contents").unwrap();
    // A folder where the report's temporary file would go cannot be created: the
    // existing report stays as it was.
    let bad = d.join("keep.json").join("sub").join("r.json");
    let out = run(&["run", "scenarios/bugs", "--report", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "previous contents"
    );
}

#[test]
fn a_data_file_outside_the_scenario_folder_is_refused_unless_allowed() {
    let d = scratch("outside");
    std::fs::create_dir_all(d.join("inner")).unwrap();
    write(&d, "prompts.txt", "a prompt from outside\n");
    let f = write(
        &d.join("inner"),
        "s.yaml",
        &format!("{BASE}data:\n  file: ../prompts.txt\n"),
    );
    let out = run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("data.file") && err.contains("--allow-outside-paths"),
        "{err}"
    );
    let out = run(&["validate", "--allow-outside-paths", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_case_over_the_memory_budget_is_refused_with_the_estimate() {
    let out = run(&[
        "run",
        "scenarios/examples/gpt2-causal-lm.yaml",
        "--max-memory",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(
        table.contains("error") && table.contains("resource guard"),
        "{table}"
    );
    assert!(table.contains("MiB (weights"), "{table}");
}

#[test]
fn a_per_platform_expectation_replaces_expect_on_that_platform() {
    let os = if cfg!(windows) {
        "windows"
    } else if cfg!(target_os = "macos") {
        "macos"
    } else {
        "linux"
    };
    let d = scratch("expect-on");
    let body = format!(
        "name: only-here\nmodel:\n  family: bloom\nprefix:\n  virtual_tokens: 2\n  layout: bloom-legacy\ngenerate:\n  max_new_tokens: 2\nexpect: pass\nexpect_on:\n  {os}: {{error: rank, layer: 0, tensor: key}}\n"
    );
    let f = write(&d, "e.yaml", &body);
    let out = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("rank @ layer 0 key"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_checkpoint_scenario_runs_a_transformers_model_with_a_peft_adapter() {
    let out = run(&["run", "tests/fixtures/llama-gqa.scenario.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).ends_with("4 passed, 0 failed, 0 skipped\n"));
}

#[test]
fn a_hub_id_that_is_not_cached_is_invalid_input_naming_the_cache_searched() {
    let d = scratch("hub");
    let cache = d.join("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let f = write(
        &d,
        "h.yaml",
        "name: hub\nmodel:\n  hub: some-org/not-cached\nprefix:\n  virtual_tokens: 2\n",
    );
    let out = bin()
        .args(["validate", &f])
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("model.hub") && err.contains("models--some-org--not-cached"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_fixture_model_and_adapter_from_a_fake_hub_cache_run_offline_and_fail_clearly_without_it() {
    let d = scratch("fake-hub");
    // The Hugging Face cache layout: refs/main (no trailing newline) -> snapshots/<rev>/.
    let repo = d.join("cache").join("models--test-org--tiny-llama-gqa");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123456789abcdef").unwrap();
    copy_dir(
        Path::new("tests/fixtures/models/llama-gqa"),
        &repo.join("snapshots").join("0123456789abcdef"),
    );
    copy_dir(
        Path::new("tests/fixtures/llama-gqa/adapter"),
        &d.join("scen").join("adapter"),
    );
    let f = write(
        &d.join("scen"),
        "hub.yaml",
        "name: from-hub\nmodel:\n  hub: test-org/tiny-llama-gqa\nprefix:\n  adapter: adapter\ndata:\n  batch_size: 2\ngenerate:\n  max_new_tokens: 3\n",
    );
    let out = bin()
        .args(["run", &f])
        .env("HF_HUB_CACHE", d.join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    std::fs::remove_dir_all(d.join("cache")).unwrap();
    let out = bin()
        .args(["run", &f])
        .env("HF_HUB_CACHE", d.join("cache"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("model.hub") && err.contains("models--test-org--tiny-llama-gqa"),
        "{err}"
    );
}

#[test]
fn a_scenario_declaring_the_wrong_diagnosis_fails_showing_both_classes() {
    let d = scratch("wrong-class");
    let f = write(
        &d,
        "w.yaml",
        "name: wrong\nmodel:\n  family: bloom\nprefix:\n  virtual_tokens: 2\n  layout: bloom-legacy\ngenerate:\n  max_new_tokens: 2\nexpect: {error: kv-heads, layer: 0, tensor: key}\n",
    );
    let out = run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(
        table.contains("expected kv-heads") && table.contains("but got: rank at layer 0 self key"),
        "{table}"
    );
}

#[test]
fn two_files_with_one_case_id_are_refused_naming_both_files() {
    let d = scratch("dup-ids");
    let a = write(&d, "a.yaml", BASE);
    let b = write(&d, "b.yaml", BASE);
    for cmd in ["run", "list", "validate"] {
        let out = run(&[cmd, d.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("case id `demo`") && err.contains(&a.replace('\\', "/")),
            "{cmd}: {err}"
        );
        assert!(err.contains(&b.replace('\\', "/")), "{cmd}: {err}");
    }
}

#[test]
fn a_shrunk_scenario_beside_its_original_keeps_case_ids_unique_and_paths_relative() {
    let d = scratch("shrink-ids");
    let src =
        std::fs::read_to_string("scenarios/bugs/peft-pr1901-gqa-attention-heads.yaml").unwrap();
    let file = write(&d, "bug.yaml", &src);
    let out = run(&[
        "repro",
        &file,
        "--shrink",
        "-o",
        d.join("report.md").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shrunk = std::fs::read_to_string(d.join("bug.shrunk.yaml")).unwrap();
    assert!(
        shrunk.starts_with("# Shrunk by `prefix-harness repro --shrink` from bug.yaml\n"),
        "{shrunk}"
    );
    assert!(
        !shrunk.contains(d.to_str().unwrap()),
        "no absolute path in the shrunk file:\n{shrunk}"
    );
    let list = run(&["list", d.to_str().unwrap()]);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    let ids: Vec<String> = text(&list.stdout).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        ids.contains(&"peft-pr1901-gqa-attention-heads-shrunk".to_string()),
        "{ids:?}"
    );
    let out = run(&["run", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
