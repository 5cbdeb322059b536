//! Platform-independent inputs and outputs: a scenario written on Windows (CRLF line
//! endings, a UTF-8 byte order mark, `\` in relative paths) means exactly what the same
//! scenario written on Linux means, and what the harness writes (reports, fingerprints)
//! uses `/` and `\n` whatever the OS.

use std::path::Path;

use prefix_harness::harness::fingerprint::{compare, Fingerprint, Tolerance};
use prefix_harness::harness::report::{self, Environment};
use prefix_harness::harness::run::{self, CaseResult, RunOptions};
use prefix_harness::harness::scenario::{self, Case};

use crate::common::{repo, TempDir};

/// Windows-style text: CRLF line endings and a UTF-8 byte order mark.
fn windows_text(s: &str) -> String {
    format!("\u{feff}{}", s.replace("\r\n", "\n").replace('\n', "\r\n"))
}

/// Copy `from` into `to` recursively; text files (`.yaml`, `.yml`, `.txt`) are
/// converted with [`windows_text`], everything else is copied byte for byte.
fn copy_as_windows(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_as_windows(&p, &dest);
        } else if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "txt")
        ) {
            std::fs::write(&dest, windows_text(&std::fs::read_to_string(&p).unwrap())).unwrap();
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn load_dir(dir: &Path) -> Vec<Case> {
    scenario::discover(&[dir.to_path_buf()])
        .unwrap()
        .iter()
        .flat_map(|f| scenario::load(f).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn run_cases(cases: &[Case]) -> Vec<CaseResult> {
    let opts = RunOptions {
        jobs: 2,
        timeout: None,
        fail_fast: false,
        // The CLI default (8 GiB).
        max_memory: 8192 << 20,
    };
    run::run_all(cases, &opts, &|_| {})
}

fn cases_json(fp: &Fingerprint) -> String {
    serde_json::to_string_pretty(&fp.cases).unwrap()
}

/// Issue 8 acceptance: a copy of the scenario folder converted to CRLF with a BOM
/// expands to the same cases, and the cases produce the same fingerprint.
#[test]
fn a_crlf_bom_copy_of_the_scenarios_gives_the_same_cases_and_fingerprint() {
    let tmp = TempDir::new("platform-crlf-copy");
    let copy = tmp.join("scenarios");
    copy_as_windows(&repo("scenarios"), &copy);
    let sample = std::fs::read(copy.join("bugs/peft-2192-fixed.yaml")).unwrap();
    assert!(sample.starts_with(b"\xef\xbb\xbf") && sample.windows(2).any(|w| w == b"\r\n"));

    let original = load_dir(&repo("scenarios"));
    let windows = load_dir(&copy);
    assert_eq!(original.len(), windows.len());
    for (a, b) in original.iter().zip(&windows) {
        assert_eq!(a.id, b.id);
        assert_eq!(a.scenario, b.scenario, "{} parses differently", a.id);
    }

    // Run every bug reproduction and the trained example from both folders.
    let pick = |cs: &[Case]| -> Vec<Case> {
        cs.iter()
            .filter(|c| c.file.contains("/bugs/") || c.id == "gpt2-causal-lm")
            .cloned()
            .collect()
    };
    let (pa, pb) = (pick(&original), pick(&windows));
    assert!(pa.len() > 15, "{}", pa.len());
    let env = || Environment::capture(2);
    let fa = Fingerprint::from_results(&run_cases(&pa), env());
    let fb = Fingerprint::from_results(&run_cases(&pb), env());
    let c = compare(&fa, &fb, Tolerance::default());
    assert!(c.is_equivalent(), "{}", c.render());
    assert_eq!(cases_json(&fa), cases_json(&fb), "not bit-identical");
}

/// An input error in a CRLF + BOM file names the same line, column and field.
#[test]
fn errors_in_crlf_bom_files_point_at_the_same_place() {
    let d = TempDir::new("platform-errors");
    let text = "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_token: 2\n";
    let lf = d.join("lf.yaml");
    let crlf = d.join("crlf.yaml");
    std::fs::write(&lf, text).unwrap();
    std::fs::write(&crlf, windows_text(text)).unwrap();
    let a = scenario::load(&lf).unwrap_err();
    let b = scenario::load(&crlf).unwrap_err();
    assert_eq!((a.line, a.column), (Some(5), Some(3)), "{a}");
    assert_eq!((b.line, b.column), (a.line, a.column), "{b}");
    assert_eq!(a.field, b.field);
    assert_eq!(a.message, b.message);
}

/// Block scalars keep `\n` inside: a CRLF file's description has no `\r`.
#[test]
fn block_scalars_in_crlf_files_have_unix_line_breaks() {
    let text = "name: demo\ndescription: |\n  first line\n  second line\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\n";
    let p = Path::new("demo.yaml");
    let a = scenario::parse(p, text).unwrap();
    let b = scenario::parse(p, &windows_text(text)).unwrap();
    assert_eq!(a[0].scenario.description, "first line\nsecond line\n");
    assert_eq!(a[0].scenario, b[0].scenario);
}

/// `data.file: sub\prompts.txt` (written on Windows) reads the same file as
/// `sub/prompts.txt`, on every OS, and the data file may itself have CRLF lines.
#[test]
fn backslashes_in_relative_data_paths_work_everywhere() {
    let d = TempDir::new("platform-backslash");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(
        d.join("sub/prompts.txt"),
        "first prompt\r\nsecond prompt\r\n\r\nthird\r\n",
    )
    .unwrap();
    let body = |file: &str| {
        format!(
            "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ndata:\n  file: {file}\n  batch_size: 3\ngenerate:\n  max_new_tokens: 2\n"
        )
    };
    let slash = scenario::parse(&d.join("slash.yaml"), &body("sub/prompts.txt")).unwrap();
    let back = scenario::parse(&d.join("back.yaml"), &body("sub\\prompts.txt"))
        .unwrap_or_else(|e| panic!("{e}"));
    let dotted = scenario::parse(&d.join("dot.yaml"), &body(".\\sub\\prompts.txt")).unwrap();
    let want = vec!["first prompt", "second prompt", "third"];
    for c in [&slash[0], &back[0], &dotted[0]] {
        assert_eq!(c.prompts().unwrap(), want);
    }
    let env = || Environment::capture(2);
    let fa = Fingerprint::from_results(&run_cases(&slash), env());
    let fb = Fingerprint::from_results(&run_cases(&back), env());
    assert_eq!(fa.cases[0].status, "pass", "{:?}", fa.cases[0]);
    assert_eq!(cases_json(&fa), cases_json(&fb));
}

/// A data file saved with a byte order mark (Notepad) gives the same prompts.
#[test]
fn a_bom_in_a_data_file_is_not_part_of_the_first_prompt() {
    let d = TempDir::new("platform-data-bom");
    std::fs::write(d.join("p.txt"), "\u{feff}hello\nworld\n").unwrap();
    let text =
        "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ndata:\n  file: p.txt\n";
    let c = scenario::parse(&d.join("s.yaml"), text).unwrap();
    assert_eq!(c[0].prompts().unwrap(), ["hello", "world"]);
}

/// A scenario as the harness writes it back (reports, snapshots, `repro`) shows
/// relative paths with `/`, whichever separator the file used.
#[test]
fn parsed_scenarios_serialise_relative_paths_with_slashes() {
    let d = TempDir::new("platform-serialise");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/p.txt"), "hello\n").unwrap();
    let text = "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ndata:\n  file: sub\\p.txt\n";
    let c = scenario::parse(&d.join("s.yaml"), text).unwrap();
    let json = serde_json::to_string(&c[0].scenario).unwrap();
    assert!(json.contains("\"sub/p.txt\""), "{json}");
}

/// Case files and error messages use `/` even when the path was given with `\`.
#[test]
fn case_files_and_messages_use_slashes() {
    let d = TempDir::new("platform-slashes");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    let text = "name: demo\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\n";
    let c = scenario::parse(Path::new("scenarios\\sub\\demo.yaml"), text).unwrap();
    assert_eq!(c[0].file, "scenarios/sub/demo.yaml");
    let missing = format!("{text}data:\n  file: sub\\nothing.txt\n");
    let e = scenario::parse(&d.join("m.yaml"), &missing).unwrap_err();
    assert_eq!(e.field, "data.file");
    assert!(e.message.contains("sub/nothing.txt"), "{}", e.message);
    assert!(!e.message.contains('\\'), "{}", e.message);
}

/// Reports and fingerprints are `\n`-separated text with `/` paths on every OS.
#[test]
fn reports_and_fingerprints_use_unix_line_endings_and_slashes() {
    let cases: Vec<Case> = load_dir(&repo("scenarios/bugs"))
        .into_iter()
        .filter(|c| c.id.starts_with("peft-2192"))
        .collect();
    let results = run_cases(&cases);
    let env = Environment::capture(2);
    let outputs = [
        ("json", report::json(&results, env.clone())),
        ("junit", report::junit(&results)),
        ("table", report::table(&results)),
        (
            "fingerprint",
            Fingerprint::from_results(&results, env).to_json(),
        ),
    ];
    for (what, text) in &outputs {
        assert!(!text.contains('\r'), "{what} has CR");
        assert!(text.ends_with('\n'), "{what} does not end with a newline");
    }
    assert!(outputs[0].1.contains("scenarios/bugs/peft-2192-fixed.yaml"));
    for r in &results {
        assert!(!r.scenario.contains('\\'), "{}", r.scenario);
    }
}
