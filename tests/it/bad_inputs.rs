//! Bad scenario inputs, data driven (like rust-analyzer's test data): every
//! `tests/bad_inputs/NAME.yaml` is checked with `prefix-harness validate NAME.yaml` (or
//! `run`, see [`command_of`]), and what the command does (exit status, then stdout and
//! stderr) must equal `tests/bad_inputs/NAME.expected` exactly. Folders beside the files
//! are their fixtures (tiny PEFT adapters and Hugging Face model folders with corrupt,
//! truncated or mismatched files).
//!
//! - Add a bad input: write `NAME.yaml` (a comment on top says what is wrong), run
//!   `BLESS=1 cargo test --test it bad_inputs::`, read the new `NAME.expected`.
//! - Every input must exit 2 (invalid input, nothing runs) with a message that starts
//!   with the file name and, where possible, gives the line and the field.
//! - An input the harness does not handle well yet (a panic, a hang, exit 0, a vague
//!   message) is a known gap: its `.expected` starts with `KNOWN GAP: why` and optional
//!   `WANT: the error it should give` lines, then the current behaviour. Known gaps are
//!   listed on every run but do not fail; once `src/` is fixed, delete the header lines
//!   and bless again, which pins the new error.
//!
//! Paths in the output are written with `/` on every OS and absolute paths into the
//! checkout start with `<root>`; panic locations lose their line and column (other
//! people's edits move them).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{blessing, harness, repo};
use prefix_harness::harness::scenario::{self, MAX_FILE_BYTES};

/// The folder of bad inputs, relative to the crate root (the tests' working folder).
const DIR: &str = "tests/bad_inputs";
/// How long one `validate` may take before it counts as a hang.
const TIME_LIMIT: Duration = Duration::from_secs(20);
/// Header lines of a known gap's `.expected` file.
const GAP: &str = "KNOWN GAP:";
const WANT: &str = "WANT:";

fn root() -> PathBuf {
    repo("")
}

/// What one run of the binary did.
struct Outcome {
    /// `Some(code)`, or `None` when killed by a signal or the time limit.
    code: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Run `prefix-harness ARGS` from the crate root, killing it after `limit`.
fn run_binary(args: &[&str], limit: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = harness()
        .args(args)
        .current_dir(root())
        .env("RUST_BACKTRACE", "0")
        // A Hub id resolves against this (absent) cache, whatever the machine has.
        .env("HF_HUB_CACHE", format!("{DIR}/no-hf-cache"))
        .env_remove("HF_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the prefix-harness binary starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = vec![];
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the binary") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Output as it is compared: `/` separators, `\n` line ends, panic locations without
/// line and column.
fn normalise(text: &str) -> String {
    let mut text = text.replace("\r\n", "\n").replace('\\', "/");
    // Absolute paths into this checkout (e.g. resolved symlinks) -> `<root>`.
    let mut roots = vec![root()];
    roots.extend(root().canonicalize());
    for r in roots {
        let r = r.to_string_lossy().replace('\\', "/");
        if r.len() > 1 {
            text = text.replace(r.trim_end_matches('/'), "<root>");
        }
    }
    text.lines()
        .map(|l| match l.find("panicked at ") {
            Some(at) => {
                let (head, tail) = l.split_at(at + "panicked at ".len());
                // `thread 'main' (12345) panicked` -> `thread 'main' panicked`
                let head = match (head.find("' ("), head.rfind(") ")) {
                    (Some(open), Some(close)) if open < close => {
                        format!("{}{}", &head[..open + 1], &head[close + 1..])
                    }
                    _ => head.to_string(),
                };
                // `src/x.rs:12:34:` -> `src/x.rs:`
                let mut parts: Vec<&str> = tail.splitn(4, ':').collect();
                if parts.len() == 4
                    && parts[1].chars().all(|c| c.is_ascii_digit())
                    && parts[2].chars().all(|c| c.is_ascii_digit())
                {
                    parts.drain(1..3);
                }
                format!("{head}{}", parts.join(":"))
            }
            None => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect()
}

/// The text an `.expected` file holds for an outcome.
fn render(o: &Outcome) -> String {
    let mut s = match (o.code, o.timed_out) {
        (_, true) => format!("timed out after {} s\n", TIME_LIMIT.as_secs()),
        (Some(c), false) => format!("exit status: {c}\n"),
        (None, false) => "terminated by a signal\n".to_string(),
    };
    for (name, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        if !text.is_empty() {
            s += &format!("--- {name}\n{}", normalise(text));
        }
    }
    s
}

/// An `.expected` file: the known-gap header (empty when none) and the behaviour.
struct Expected {
    header: String,
    body: String,
}

impl Expected {
    fn parse(text: &str) -> Self {
        let text = text.replace("\r\n", "\n");
        let mut header = String::new();
        let mut rest = text.as_str();
        while rest.starts_with(GAP) || rest.starts_with(WANT) {
            let end = rest.find('\n').map(|i| i + 1).unwrap_or(rest.len());
            header += &rest[..end];
            rest = &rest[end..];
        }
        Expected {
            header,
            body: rest.to_string(),
        }
    }

    fn is_gap(&self) -> bool {
        self.header.starts_with(GAP)
    }

    /// The first `KNOWN GAP:` line, without the marker.
    fn why(&self) -> &str {
        self.header
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches(GAP)
            .trim()
    }
}

/// The command an input is checked with: `validate`, unless a leading comment line says
/// `# bad-input-command: run` (an input `validate` must accept because the run
/// diagnoses it, e.g. an adapter saved for another model: scenarios may expect that
/// diagnosis). Such an input must make `run` exit 1.
fn command_of(name: &str) -> &'static str {
    let text = std::fs::read(root().join(DIR).join(format!("{name}.yaml"))).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let run = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .any(|l| l.trim() == "# bad-input-command: run");
    if run {
        "run"
    } else {
        "validate"
    }
}

/// `run` output without its timings: `12 ms` -> `N ms`, runs of spaces collapsed (the
/// table's column widths follow the numbers).
fn without_durations(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').filter(|w| !w.is_empty()).collect();
        let mut kept = vec![];
        for (i, w) in words.iter().enumerate() {
            let next_is_ms = words.get(i + 1).is_some_and(|n| n.starts_with("ms"));
            let number = w.trim_start_matches('(');
            if next_is_ms
                && !number.is_empty()
                && number.chars().all(|c| c.is_ascii_digit() || c == '.')
            {
                kept.push(format!("{}N", &w[..w.len() - number.len()]));
            } else {
                kept.push(w.to_string());
            }
        }
        out += &kept.join(" ");
        out.push('\n');
    }
    out
}

/// Every `NAME.yaml` in the folder, by name.
fn inputs() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join(DIR))
        .expect("tests/bad_inputs exists")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".yaml").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

fn expected_path(name: &str) -> PathBuf {
    root().join(DIR).join(format!("{name}.expected"))
}

fn input_arg(name: &str) -> String {
    format!("{DIR}/{name}.yaml")
}

/// Line-by-line difference, for a readable failure.
fn diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut out = String::new();
    for i in 0..w.len().max(g.len()) {
        match (w.get(i), g.get(i)) {
            (Some(a), Some(b)) if a == b => out += &format!("    {a}\n"),
            (a, b) => {
                if let Some(a) = a {
                    out += &format!("  - {a}\n");
                }
                if let Some(b) = b {
                    out += &format!("  + {b}\n");
                }
            }
        }
    }
    out
}

/// Written straight to the process's stderr, so the list shows even when the test
/// harness captures output.
fn announce(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

#[test]
fn every_bad_input_gives_exactly_its_expected_error() {
    let bless = blessing();
    let names = inputs();
    assert!(names.len() >= 40, "only {} bad inputs found", names.len());
    let mut failures = vec![];
    let mut gaps = vec![];
    let mut changed_gaps = vec![];
    for name in &names {
        let command = command_of(name);
        let outcome = run_binary(&[command, &input_arg(name)], TIME_LIMIT);
        let mut got = render(&outcome);
        if command == "run" {
            got = without_durations(&got);
        }
        let path = expected_path(name);
        let expected = std::fs::read_to_string(&path)
            .ok()
            .map(|t| Expected::parse(&t));
        if bless {
            let header = expected.as_ref().map(|e| e.header.as_str()).unwrap_or("");
            if expected.as_ref().is_none_or(|e| e.body != got) {
                std::fs::write(&path, format!("{header}{got}")).expect("write .expected");
                announce(&format!("blessed {DIR}/{name}.expected\n"));
            }
        }
        let Some(expected) = expected else {
            if !bless {
                failures.push(format!(
                    "{name}: no {name}.expected; run `BLESS=1 cargo test --test it bad_inputs::` and read it\n{got}"
                ));
            }
            continue;
        };
        if expected.is_gap() {
            let why = expected.why();
            let short: String = why.chars().take(110).collect();
            let more = if short.len() < why.len() { "..." } else { "" };
            gaps.push(format!("{name}: {short}{more}"));
            if expected.body != got && !bless {
                changed_gaps.push(format!("{name}:\n{}", diff(&expected.body, &got)));
            }
            continue;
        }
        if expected.body != got && !bless {
            failures.push(format!(
                "{name}: output differs from {name}.expected (- expected, + actual):\n{}",
                diff(&expected.body, &got)
            ));
            continue;
        }
        // What every handled bad input must do, whatever its message.
        let first = outcome.stderr.lines().next().unwrap_or("");
        let want_code = if command == "run" { 1 } else { 2 };
        if outcome.code != Some(want_code) {
            failures.push(format!(
                "{name}: `{command}` exits {:?}, not {want_code}; fix src/ or mark it `{GAP}`",
                outcome.code
            ));
        } else if outcome.elapsed > Duration::from_secs(5) {
            failures.push(format!(
                "{name}: took {:?}; a bad input must be refused within seconds",
                outcome.elapsed
            ));
        } else if outcome.stderr.contains("panicked") {
            failures.push(format!("{name}: panics; fix src/ or mark it `{GAP}`"));
        } else if command == "validate"
            && !normalise(first).starts_with(&format!("error: {}", input_arg(name)))
        {
            failures.push(format!(
                "{name}: the first error line does not start with the file name: {first}"
            ));
        }
    }
    for e in std::fs::read_dir(root().join(DIR)).unwrap().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = file.strip_suffix(".expected") {
            if !names.iter().any(|n| n == stem) {
                failures.push(format!("{file}: no {stem}.yaml beside it (stale?)"));
            }
        }
    }
    if !gaps.is_empty() {
        announce(&format!(
            "bad_inputs: {} of {} inputs are known gaps (not failing; see their .expected):\n  {}\n",
            gaps.len(),
            names.len(),
            gaps.join("\n  ")
        ));
    }
    if !changed_gaps.is_empty() {
        announce(&format!(
            "bad_inputs: these known gaps now behave differently (fixed? delete the KNOWN GAP lines and bless):\n{}",
            changed_gaps.join("\n")
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs failed (bless with BLESS=1 cargo test --test it bad_inputs::):\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

/// The same check in-process: `scenario::load` returns the error the binary prints, and
/// never panics, for every input that is not a known gap.
#[test]
fn library_load_gives_the_error_the_binary_prints() {
    if blessing() {
        return; // the other test is rewriting the .expected files
    }
    for name in inputs() {
        let Ok(text) = std::fs::read_to_string(expected_path(&name)) else {
            continue;
        };
        let expected = Expected::parse(&text);
        if expected.is_gap() || command_of(&name) == "run" {
            continue;
        }
        let Some(want) = expected
            .body
            .lines()
            .skip_while(|l| *l != "--- stderr")
            .nth(1)
        else {
            continue;
        };
        if want.contains("no-hf-cache") {
            continue; // the binary ran with its own HF_HUB_CACHE; this process did not
        }
        let path = PathBuf::from(input_arg(&name));
        let got = std::panic::catch_unwind(|| scenario::load(&path))
            .unwrap_or_else(|_| panic!("{name}: scenario::load panicked"));
        let err = got
            .err()
            .unwrap_or_else(|| panic!("{name}: scenario::load accepted it"));
        let rendered = normalise(&format!("error: {err}")).trim_end().to_string();
        assert_eq!(rendered, want, "{name}");
    }
}

/// A file over `MAX_FILE_BYTES` is refused from its size alone (generated here, not
/// committed: 2 MiB of valid YAML).
#[test]
fn a_2_mib_scenario_file_is_refused_before_parsing() {
    let dir =
        std::env::temp_dir().join(format!("prefix-harness-bad-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("two-mib.yaml");
    let mut body =
        String::from("name: big\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\n");
    while body.len() < 2 << 20 {
        body += "# padding padding padding padding padding padding padding padding padding\n";
    }
    std::fs::write(&file, &body).unwrap();
    let bytes = body.len();
    assert!(bytes > MAX_FILE_BYTES);

    let start = Instant::now();
    let err = scenario::load(&file).expect_err("a 2 MiB file is refused");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        err.to_string().replace('\\', "/"),
        format!(
            "{}: the file has {bytes} bytes; scenario files are limited to {MAX_FILE_BYTES}",
            file.to_string_lossy().replace('\\', "/")
        )
    );

    let out = run_binary(&["validate", &file.to_string_lossy()], TIME_LIMIT);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert_eq!(
        normalise(&out.stderr),
        normalise(&format!(
            "error: {}: the file has {bytes} bytes; scenario files are limited to {MAX_FILE_BYTES}\n1 invalid scenario file(s); nothing was run\n",
            file.to_string_lossy()
        ))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The size limit is inclusive: a file of exactly `MAX_FILE_BYTES` bytes loads, one
/// byte more is refused.
#[test]
fn a_scenario_file_of_exactly_the_limit_loads_and_one_byte_more_does_not() {
    let dir =
        std::env::temp_dir().join(format!("prefix-harness-size-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let head = "name: edge\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\n#";
    for (extra, loads) in [(0, true), (1, false)] {
        let mut body = String::from(head);
        body.push_str(&"x".repeat(MAX_FILE_BYTES + extra - head.len() - 1));
        body.push('\n');
        assert_eq!(body.len(), MAX_FILE_BYTES + extra);
        let file = dir.join(format!("edge-{extra}.yaml"));
        std::fs::write(&file, &body).unwrap();
        assert_eq!(scenario::load(&file).is_ok(), loads, "{} bytes", body.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file under the node budget is judged on its content, however many parser events
/// its nesting makes: 6,700 one-element lists (about 13,400 nodes and 20,100 events)
/// are refused for their case count, not by the parser's budget.
#[test]
fn a_file_under_the_node_budget_is_judged_on_its_content() {
    let dir = std::env::temp_dir().join(format!("prefix-harness-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let items = vec!["[1]"; 6700].join(",");
    let body = format!(
        "name: edge\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\nmatrix:\n  prefix.virtual_tokens: [{items}]\n"
    );
    let file = dir.join("nested.yaml");
    std::fs::write(&file, &body).unwrap();
    let err = scenario::load(&file).expect_err("6700 cases").to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("the matrix expands to 6700 cases"), "{err}");
}

/// Billion laughs and deep nesting are refused by the parser's budgets, fast: the
/// aliases are never expanded and the nesting never reaches the stack. While an input
/// is a known gap or not, it only has to finish well within the hang limit.
#[test]
fn alias_bombs_and_deep_nesting_are_refused_quickly() {
    for name in [
        "yaml-alias-bomb",
        "yaml-deep-flow-nesting",
        "yaml-deep-block-nesting",
    ] {
        let gap = std::fs::read_to_string(expected_path(name))
            .map(|t| Expected::parse(&t).is_gap())
            .unwrap_or(false);
        // Hang detection only: speed is measured in benchmarks and notes, never
        // asserted by a timed test on a shared machine.
        let _ = gap;
        let limit = TIME_LIMIT;
        let path = PathBuf::from(input_arg(name));
        let start = Instant::now();
        let got = scenario::load(&path);
        let took = start.elapsed();
        assert!(got.is_err(), "{name} was accepted");
        assert!(took < limit, "{name} took {took:?} (limit {limit:?})");
    }
}
/// The normalisation used by the comparison, on the two things it rewrites.
#[test]
fn output_normalisation_uses_slashes_and_drops_panic_line_numbers_and_timings() {
    assert_eq!(
        normalise("error: tests\\bad_inputs\\x.yaml: no such file: tests\\bad_inputs\\d\r\n"),
        "error: tests/bad_inputs/x.yaml: no such file: tests/bad_inputs/d\n"
    );
    assert_eq!(
        normalise(
            "thread 'main' (4242) panicked at src/harness/scenario/matrix.rs:465:29:\nattempt to multiply with overflow\n"
        ),
        "thread 'main' panicked at src/harness/scenario/matrix.rs:\nattempt to multiply with overflow\n"
    );
    assert_eq!(
        without_durations("[1/1] fail demo (7 ms)\ndemo  fail     pass      12.5 ms  head-dim\n"),
        "[1/1] fail demo (N ms)\ndemo fail pass N ms head-dim\n"
    );
    let e = Expected::parse("KNOWN GAP: panics\nWANT: error: x\nexit status: 101\n");
    assert!(e.is_gap());
    assert_eq!(e.why(), "panics");
    assert_eq!(e.body, "exit status: 101\n");
}
