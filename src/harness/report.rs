//! Reports for people and for CI: the summary table, the JSON report (stable format,
//! documented in the README), JUnit XML, and the environment block.

use serde::{Deserialize, Serialize};

use crate::harness::run::{CaseResult, Status};

/// Where a run happened. Fingerprints carry it too and read it back: every field has a
/// default so that files written by other versions still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Environment {
    pub os: String,
    pub arch: String,
    pub cpu_features: Vec<String>,
    pub rustc: String,
    pub candle: String,
    /// Threads candle's kernels use in each case.
    pub threads: usize,
    /// Cases run at the same time.
    pub jobs: usize,
}

impl Environment {
    pub fn capture(jobs: usize) -> Self {
        Self {
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            cpu_features: cpu_features(),
            rustc: env!("PH_RUSTC_VERSION").to_string(),
            candle: env!("PH_CANDLE_VERSION").to_string(),
            threads: candle_core::utils::get_num_threads(),
            jobs,
        }
    }
}

#[allow(unused_mut)]
fn cpu_features() -> Vec<String> {
    let mut f: Vec<&str> = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            f.push("avx");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::arch::is_x86_feature_detected!("f16c") {
            f.push("f16c");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f.into_iter().map(String::from).collect()
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    pub tool_version: &'static str,
    pub environment: Environment,
    pub summary: Summary,
    pub cases: &'a [CaseResult],
}

/// Counts by status.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub error: usize,
}

impl Summary {
    pub fn of(results: &[CaseResult]) -> Self {
        let mut s = Summary {
            total: results.len(),
            ..Default::default()
        };
        for r in results {
            match r.status {
                Status::Pass => s.pass += 1,
                Status::Fail => s.fail += 1,
                Status::Skip => s.skip += 1,
                Status::Error => s.error += 1,
            }
        }
        s
    }

    /// Every case met its expectation (skips are fine).
    pub fn ok(&self) -> bool {
        self.fail == 0 && self.error == 0
    }
}

pub fn json(results: &[CaseResult], env: Environment) -> String {
    let report = Report {
        tool_version: env!("CARGO_PKG_VERSION"),
        environment: env,
        summary: Summary::of(results),
        cases: results,
    };
    serde_json::to_string_pretty(&report).expect("report serialises") + "\n"
}

fn xml_escape(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(*c as u32, 0..=8 | 11 | 12 | 14..=31))
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&apos;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML: one `testsuite` per run, one `testcase` per case (classname: the file).
pub fn junit(results: &[CaseResult]) -> String {
    let s = Summary::of(results);
    let total_s: f64 = results.iter().map(|r| r.duration_ms).sum::<f64>() / 1e3;
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out += &format!(
        "<testsuites name=\"prefix-harness\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{total_s:.3}\">\n",
        s.total, s.fail, s.error, s.skip
    );
    out += &format!(
        "  <testsuite name=\"prefix-harness\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{total_s:.3}\">\n",
        s.total, s.fail, s.error, s.skip
    );
    for r in results {
        out += &format!(
            "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\"",
            xml_escape(&r.id),
            xml_escape(&r.scenario),
            r.duration_ms / 1e3
        );
        let msg = xml_escape(r.message.as_deref().unwrap_or(""));
        match r.status {
            Status::Pass => out += " />\n",
            Status::Fail => {
                out += &format!(
                    ">\n      <failure message=\"{msg}\" type=\"{}\">expected: {}</failure>\n    </testcase>\n",
                    r.diagnosis.as_ref().map(|d| d.class.as_str()).unwrap_or("no-failure"),
                    xml_escape(&r.expected)
                )
            }
            Status::Error => out += &format!(">\n      <error message=\"{msg}\" />\n    </testcase>\n"),
            Status::Skip => out += &format!(">\n      <skipped message=\"{msg}\" />\n    </testcase>\n"),
        }
    }
    out += "  </testsuite>\n</testsuites>\n";
    out
}

/// The summary table printed at the end of a run.
pub fn table(results: &[CaseResult]) -> String {
    let rows: Vec<[String; 5]> = results
        .iter()
        .map(|r| {
            let mut diag = match (&r.diagnosis, &r.message) {
                (Some(d), _) if r.status == Status::Pass => {
                    format!("{} at {}", d.class.as_str(), d.place())
                }
                (_, Some(m)) => m.clone(),
                (Some(d), None) => d.to_string(),
                (None, None) => String::new(),
            };
            for w in r
                .warnings
                .iter()
                .filter(|w| Some(*w) != r.diagnosis.as_ref())
            {
                let text = format!("warning: {} at {}", w.class.as_str(), w.place());
                diag = if diag.is_empty() {
                    text
                } else {
                    format!("{diag}; {text}")
                };
            }
            if let Some(o) = r.stack.as_ref().filter(|_| !diag.starts_with("stack: ")) {
                let text = format!("stack {}", o.describe());
                diag = if diag.is_empty() {
                    text
                } else {
                    format!("{diag}; {text}")
                };
            }
            if let (Some(first), Some(last)) = (r.losses.first(), r.losses.last()) {
                let loss = format!("loss {first:.3} -> {last:.3} ({} steps)", r.losses.len());
                diag = if diag.is_empty() {
                    loss
                } else {
                    format!("{loss}; {diag}")
                };
            }
            [
                r.id.clone(),
                r.status.as_str().to_string(),
                r.expected.clone(),
                format!("{:.0} ms", r.duration_ms),
                diag,
            ]
        })
        .collect();
    // A cell is cut at `MAX_CELL` characters: the table stays readable, and no column
    // width can exceed what `format!` accepts (u16::MAX; the JSON report keeps all).
    let rows: Vec<[String; 5]> = rows.into_iter().map(|r| r.map(cut_cell)).collect();
    let head = ["case", "outcome", "expected", "time", "diagnosis"];
    let mut w = head.map(str::len);
    for row in &rows {
        for (i, c) in row.iter().enumerate().take(4) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        )
    };
    let mut out = line(head);
    for row in &rows {
        out += &line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    let s = Summary::of(results);
    out += &format!(
        "\n{} cases: {} met their expectation, {} did not, {} could not run (errors), {} skipped\n",
        s.total, s.pass, s.fail, s.error, s.skip
    );
    // The conventional closing line CI dashboards read (errors count as failures).
    out += &format!(
        "{} passed, {} failed, {} skipped\n",
        s.pass,
        s.fail + s.error,
        s.skip
    );
    out
}

/// Longest table cell, in characters.
pub const MAX_CELL: usize = 400;

/// `text` cut to [`MAX_CELL`] characters, the cut marked with `...`.
fn cut_cell(text: String) -> String {
    if text.chars().count() <= MAX_CELL {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_CELL - 3).collect();
    cut.push_str("...");
    cut
}

/// Write `contents` to `path` atomically: a temporary file beside it, then a rename,
/// so an existing file is never left truncated.
pub fn write_atomic(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: String, message: Option<String>) -> CaseResult {
        CaseResult {
            duration_ms: 1.0,
            message,
            ..CaseResult::blank(id, "s.yaml".into(), Status::Error, "pass".into())
        }
    }

    #[test]
    fn table_cells_are_cut_so_that_huge_ids_and_messages_do_not_panic() {
        // Column widths above u16::MAX made `format!` panic.
        let huge = "x".repeat(70_000);
        let t = table(&[result(huge.clone(), Some(huge)), result("b".into(), None)]);
        let first = t.lines().nth(1).unwrap();
        assert!(first.starts_with(&format!("{}...", "x".repeat(MAX_CELL - 3))));
        assert!(
            first.len() < 3 * MAX_CELL,
            "cells cut: {} bytes",
            first.len()
        );
        assert!(t.contains("0 passed, 2 failed, 0 skipped"));
        let short = "y".repeat(MAX_CELL);
        assert_eq!(
            cut_cell(short.clone()),
            short,
            "a cell at the limit is kept whole"
        );
    }
}
