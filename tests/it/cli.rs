//! The command line as a user meets it: exit codes, errors that name file, line and
//! field, shards that partition the cases, and reports that parse.

use std::path::Path;

use crate::common::{
    assert_contains, exited, harness, read_json, run_cli as run, text, write, TempDir,
};

const BASE: &str = "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ngenerate:\n  max_new_tokens: 2\n";

/// Stands in a row's argv for the path of the row's scenario file.
const FILE: &str = "{file}";

/// Stands in a row's argv, environment and fragments for the row's folder (with `/`
/// separators in the fragments).
const DIR: &str = "{dir}";

/// The stream a row's fragments are looked for in.
#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// One row of the command-line table: the scenario file written to a fresh folder (if
/// any; its name may hold a subfolder), more files written beside it, the argv (`FILE`
/// stands for that file, `DIR` for the folder), the environment, the exit code, and the
/// fragments the stream must contain.
struct Row {
    file: Option<(&'static str, String)>,
    more: &'static [(&'static str, &'static str)],
    argv: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    code: i32,
    stream: Stream,
    fragments: &'static [&'static str],
}

/// Writes `body` to `dir/name`, making `name`'s folders; the path as text.
fn write_in(dir: &Path, name: &str, body: &str) -> String {
    if let Some(parent) = dir.join(name).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    write(dir, name, body)
}

fn check(name: &str, row: Row) {
    let d = TempDir::new(&format!("cli-{name}"));
    let dir = d.to_str().unwrap();
    for (n, body) in row.more {
        write_in(&d, n, body);
    }
    let file = row.file.map(|(n, body)| write_in(&d, n, &body));
    let argv: Vec<String> = row
        .argv
        .iter()
        .map(|a| match *a {
            FILE => file.clone().expect("a row naming FILE writes one"),
            a => a.replace(DIR, dir),
        })
        .collect();
    let mut cmd = harness();
    cmd.args(&argv);
    for (k, v) in row.env {
        cmd.env(k, v.replace(DIR, dir));
    }
    let out = cmd.output().expect("the binary runs");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(row.code),
        "{name}:\n{stdout}{stderr}"
    );
    let shown = match row.stream {
        Stream::Stdout => &stdout,
        Stream::Stderr => &stderr,
    };
    for f in row.fragments {
        let f = f.replace(DIR, &dir.replace('\\', "/"));
        assert!(
            shown.contains(&f),
            "{name}: no `{f}` in {:?}:\n{shown}",
            row.stream
        );
    }
}

/// The table: one `#[test]` per row, named by the row.
macro_rules! table {
    ($(
        $name:ident: $file:expr, $argv:expr $(, beside $more:expr)? $(, env $env:expr)?
        => $code:literal $stream:ident $fragments:expr;
    )*) => {$(
        #[test]
        fn $name() {
            let row = Row {
                file: $file,
                more: table!(@or_none $($more)?),
                argv: &$argv,
                env: table!(@or_none $($env)?),
                code: $code,
                stream: Stream::$stream,
                fragments: &$fragments,
            };
            check(stringify!($name), row);
        }
    )*};
    (@or_none) => { &[] };
    (@or_none $pairs:expr) => { &$pairs };
}

/// The platform this test runs on, as `platforms:` and `expect_on:` name it.
fn this_os() -> &'static str {
    if cfg!(windows) {
        "windows"
    } else if cfg!(target_os = "macos") {
        "macos"
    } else {
        "linux"
    }
}

/// The reason a case meant for another platform than this one is skipped (the test
/// below names Linux on Windows and Windows elsewhere).
const SKIP_REASON: &str = if cfg!(windows) {
    "meant for linux; this is windows"
} else {
    "meant for windows; this is"
};

const BLOOM_LEGACY: &str = "model:\n  family: bloom\nprefix:\n  virtual_tokens: 2\n  layout: bloom-legacy\ngenerate:\n  max_new_tokens: 2\n";

table! {
    a_typo_in_a_key_exits_2_naming_file_line_field_and_suggestion:
        Some(("typo.yaml", BASE.replace("virtual_tokens", "virtual_token"))), ["run", FILE]
        => 2 Stderr ["typo.yaml:5:3", "prefix.virtual_token", "did you mean `virtual_tokens`?"];
    a_wrong_type_exits_2_naming_the_field:
        Some(("t.yaml", format!("{BASE}data:\n  batch_size: three\n"))), ["validate", FILE]
        => 2 Stderr ["t.yaml:9:", "data.batch_size", "three"];
    a_negative_size_exits_2_naming_the_field:
        Some(("n.yaml", BASE.replace("virtual_tokens: 2", "virtual_tokens: -2"))), ["validate", FILE]
        => 2 Stderr ["n.yaml:5:", "prefix.virtual_tokens"];
    zero_virtual_tokens_is_invalid_input:
        Some(("z.yaml", BASE.replace("virtual_tokens: 2", "virtual_tokens: 0"))), ["validate", FILE]
        => 2 Stderr ["z.yaml:5: field `prefix.virtual_tokens`: expected at least 1"];
    an_expected_failure_that_does_not_happen_fails_the_run:
        Some(("f.yaml", format!("{BASE}expect: {{error: rank, layer: 0}}\n"))), ["run", FILE]
        => 1 Stdout ["demo", "fail", "fixed? update the scenario", "0 passed, 1 failed, 0 skipped\n"];
    the_peft_2192_reproduction_passes_as_an_expected_rank_failure:
        None, ["run", "scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml"]
        => 0 Stdout ["rank at layer 0 self key"];
    cases_for_another_platform_are_skipped_with_the_reason:
        Some(("p.yaml", format!("{BASE}platforms: [{}]\n", if this_os() == "windows" { "linux" } else { "windows" }))),
        ["run", FILE]
        => 0 Stdout ["skip", SKIP_REASON];
    a_case_over_the_memory_budget_is_refused_with_the_estimate:
        None, ["run", "scenarios/examples/gpt2-causal-lm.yaml", "--max-memory", "1"]
        => 1 Stdout ["error", "resource guard", "MiB (weights"];
    a_per_platform_expectation_replaces_expect_on_that_platform:
        Some(("e.yaml", format!("name: only-here\n{BLOOM_LEGACY}expect: pass\nexpect_on:\n  {}: {{error: rank, layer: 0, tensor: key}}\n", this_os()))),
        ["run", FILE]
        => 0 Stdout ["rank @ layer 0 key"];
    a_checkpoint_scenario_runs_a_transformers_model_with_a_peft_adapter:
        None, ["run", "tests/fixtures/llama-gqa.scenario.yaml"]
        => 0 Stdout ["4 passed, 0 failed, 0 skipped\n"];
    a_scenario_declaring_the_wrong_diagnosis_fails_showing_both_classes:
        Some(("w.yaml", format!("name: wrong\n{BLOOM_LEGACY}expect: {{error: kv-heads, layer: 0, tensor: key}}\n"))),
        ["run", FILE]
        => 1 Stdout ["expected kv-heads", "but got: rank at layer 0 self key"];
    a_hub_id_that_is_not_cached_is_invalid_input_naming_the_cache_searched:
        Some(("h.yaml", "name: hub\nmodel:\n  hub: some-org/not-cached\nprefix:\n  virtual_tokens: 2\n".into())),
        ["validate", FILE], env [("HF_HUB_CACHE", DIR)]
        => 2 Stderr ["model.hub", "models--some-org--not-cached"];
    a_data_file_outside_the_scenario_folder_is_refused:
        Some(("inner/s.yaml", format!("{BASE}data:\n  file: ../prompts.txt\n"))),
        ["validate", FILE], beside [("prompts.txt", "a prompt from outside\n")]
        => 2 Stderr ["data.file", "--allow-outside-paths"];
    a_data_file_outside_the_scenario_folder_is_allowed_with_allow_outside_paths:
        Some(("inner/s.yaml", format!("{BASE}data:\n  file: ../prompts.txt\n"))),
        ["validate", "--allow-outside-paths", FILE], beside [("prompts.txt", "a prompt from outside\n")]
        => 0 Stderr [];
    a_run_with_allow_outside_paths_reads_a_data_file_outside_the_scenario_folder:
        Some(("inner/s.yaml", format!("{BASE}data:\n  file: ../prompts.txt\n"))),
        ["run", "--allow-outside-paths", FILE], beside [("prompts.txt", "a prompt from outside\n")]
        => 0 Stdout ["1 passed"];
    a_repro_with_allow_outside_paths_repeats_the_flag_in_its_reproduce_command:
        Some(("inner/s.yaml", format!("{BASE}data:\n  file: ../prompts.txt\n"))),
        ["repro", "--allow-outside-paths", FILE], beside [("prompts.txt", "a prompt from outside\n")]
        => 0 Stdout ["prefix-harness repro --allow-outside-paths {dir}/inner/s.yaml"];
    two_files_with_one_case_id_are_refused_by_run_naming_both_files:
        None, ["run", DIR], beside [("a.yaml", BASE), ("b.yaml", BASE)]
        => 2 Stderr ["case id `demo`", "{dir}/a.yaml", "{dir}/b.yaml"];
    two_files_with_one_case_id_are_refused_by_list_naming_both_files:
        None, ["list", DIR], beside [("a.yaml", BASE), ("b.yaml", BASE)]
        => 2 Stderr ["case id `demo`", "{dir}/a.yaml", "{dir}/b.yaml"];
    two_files_with_one_case_id_are_refused_by_validate_naming_both_files:
        None, ["validate", DIR], beside [("a.yaml", BASE), ("b.yaml", BASE)]
        => 2 Stderr ["case id `demo`", "{dir}/a.yaml", "{dir}/b.yaml"];
}

fn ids_of_report(path: &Path) -> Vec<String> {
    read_json(path)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// Two folders (57 cases from 6 files, so no shard is a whole file): the whole tree is run
/// by `snapshots::` and `.ci/run`; running it once more here only cost time.
#[test]
fn three_shards_cover_every_case_exactly_once() {
    let d = TempDir::new("cli-shards");
    const PATHS: [&str; 2] = ["scenarios/cache", "scenarios/examples"];
    let listed = text(&run(&[&["list"], &PATHS[..]].concat()).stdout);
    let mut all: Vec<String> = listed.lines().map(str::to_string).collect();
    let mut seen = vec![];
    for i in 1..=3 {
        let rep = d.join(format!("shard{i}.json"));
        let out = run(&[
            "run",
            PATHS[0],
            PATHS[1],
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
    let d = TempDir::new("cli-reports");
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
    let v = read_json(&json);
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
    let d = TempDir::new("cli-atomic");
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
    let d = TempDir::new("cli-fake-hub");
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
    let run_from_cache = |offline: &[(&str, &str)]| {
        let mut c = harness();
        c.args(["run", &f]).env("HF_HUB_CACHE", d.join("cache"));
        c.envs(offline.iter().copied()).output().unwrap()
    };
    exited(&run_from_cache(&[("HF_HUB_OFFLINE", "1")]), 0);
    std::fs::remove_dir_all(d.join("cache")).unwrap();
    let (_, err) = exited(&run_from_cache(&[]), 2);
    assert_contains(&err, "model.hub");
    assert_contains(&err, "models--test-org--tiny-llama-gqa");
}

#[test]
fn a_shrunk_scenario_beside_its_original_keeps_case_ids_unique_and_paths_relative() {
    let d = TempDir::new("cli-shrink-ids");
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
