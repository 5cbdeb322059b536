//! Bug reproduction: run a scenario, explain its outcome as a Markdown report ready to
//! paste into an issue (diagnosis, scenario, cache events up to the failure,
//! environment), and optionally shrink the failing case to the smallest one that still
//! fails the same way.

use std::path::Path;

use crate::engine::diagnosis::Diagnosis;
use crate::engine::trace::TraceEvent;
use crate::harness::report::Environment;
use crate::harness::run::{run_case, CaseResult, Status};
use crate::harness::scenario::{self, Case};

/// Cache events shown at the start and at the end of a long trace.
const EVENTS_SHOWN: usize = 12;

fn shape(s: &Option<Vec<usize>>) -> String {
    s.as_ref()
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "-".into())
}

fn event_row(e: &TraceEvent) -> String {
    format!(
        "| {} | {} | {} | {:?} | {} | {} | {} | {} | {} | {} |\n",
        e.step,
        e.layer,
        e.attention,
        e.op,
        match e.ring_head {
            Some(h) => format!("{}, ring head {h}", e.layout),
            None => e.layout.to_string(),
        },
        shape(&e.shapes.key_before),
        shape(&e.shapes.key_written),
        shape(&e.shapes.key_after),
        shape(&e.mask),
        e.positions
            .map(|(a, b)| format!("{a}..{b}"))
            .unwrap_or_else(|| "-".into()),
    )
}

fn diagnosis_block(d: &Diagnosis) -> String {
    let mut md = format!("**Diagnosis:** `{}` at {}\n\n", d.class.as_str(), d.place());
    // Silent failures (divergence, no-grad) have no shapes to show.
    if !d.expected_shape.is_empty() || !d.actual_shape.is_empty() {
        md += &format!(
            "- expected shape: `{:?}` (rank {})\n- actual shape: `{:?}` (rank {})\n",
            d.expected_shape,
            d.expected_shape.len(),
            d.actual_shape,
            d.actual_shape.len(),
        );
    }
    md += &format!(
        "- message: {}\n- likely cause: {}\n",
        d.message,
        if d.hint.is_empty() { "-" } else { &d.hint },
    );
    md
}

/// The Markdown section of one case.
pub fn case_markdown(case: &Case, r: &CaseResult) -> String {
    let mut md = format!("## `{}`\n\n", r.id);
    md += &format!(
        "**Outcome:** {} (expected: {}) in {:.0} ms\n\n",
        r.status.as_str(),
        r.expected,
        r.duration_ms
    );
    if let Some(d) = &r.diagnosis {
        md += &diagnosis_block(d);
        md += "\n";
    }
    if let Some(m) = r.message.as_ref().filter(|_| r.status != Status::Pass) {
        md += &format!("**Why it did not meet the expectation:** {m}\n\n");
    }
    let s = &case.scenario;
    md += &format!(
        "Model `{}` (seed {}), P = {}, cache `{:?}`, prefix layout `{:?}`, batch {}.\n\n",
        s.model.describe(),
        s.model.seed,
        s.prefix.virtual_tokens,
        s.cache.mode,
        s.prefix.layout,
        s.data.batch_size
    );
    if let Some(t) = &r.trace {
        let n = t.events.len();
        md += &format!("### Cache events ({n}, up to the end or the failure)\n\n");
        md += "| step | layer | attention | op | layout | key before | key written | key after | mask | positions |\n";
        md += "|---|---|---|---|---|---|---|---|---|---|\n";
        if n <= 2 * EVENTS_SHOWN {
            t.events.iter().for_each(|e| md += &event_row(e));
        } else {
            t.events[..EVENTS_SHOWN]
                .iter()
                .for_each(|e| md += &event_row(e));
            md += &format!(
                "| ... | {} more events | | | | | | | | |\n",
                n - 2 * EVENTS_SHOWN
            );
            t.events[n - EVENTS_SHOWN..]
                .iter()
                .for_each(|e| md += &event_row(e));
        }
        md += &format!("\nTrace digest: `{}`\n\n", t.digest());
    }
    if !r.tokens.is_empty() {
        md += &format!("Generated ids: `{:?}`\n\n", r.tokens);
    }
    if let Some(o) = &r.stack {
        md += &stack_markdown(o);
    }
    md
}

/// What the Python stack did with the case (`repro --against peft`).
fn stack_markdown(o: &crate::harness::stack::StackOutcome) -> String {
    let v = &o.versions;
    let mut md = format!(
        "### On the Python stack\n\npython {}, {}: **{}**: {}\n\n",
        v.python.as_deref().unwrap_or("?"),
        v.describe(),
        o.verdict.as_str(),
        o.detail
    );
    if let Some(d) = &o.diagnosis {
        md += &format!("- diagnosis: `{}` at {}\n", d.class.as_str(), d.place());
        if !d.expected_shape.is_empty() || !d.actual_shape.is_empty() {
            md += &format!(
                "- written `{:?}`, held by the cache `{:?}`\n",
                d.expected_shape, d.actual_shape
            );
        }
    }
    if let Some(e) = &o.error {
        md += &format!("- exception: `{e}`\n");
    }
    if !o.tokens.is_empty() {
        md += &format!("- greedy ids through the PEFT forward: `{:?}`\n", o.tokens);
    }
    if !o.generate_tokens.is_empty() {
        md += &format!("- `PeftModel.generate` ids: `{:?}`\n", o.generate_tokens);
    }
    for w in v.warnings() {
        md += &format!("- warning: {w}\n");
    }
    md + "\n"
}

/// The whole report for a scenario file. `flags`: the command-line flags the
/// "Reproduce" command must repeat (`--allow-outside-paths`, `--against peft`).
pub fn markdown(
    file: &Path,
    text: &str,
    cases: &[Case],
    results: &[CaseResult],
    env: &Environment,
    flags: &[&str],
) -> String {
    let name = cases
        .first()
        .map(|c| c.scenario.name.as_str())
        .unwrap_or("scenario");
    let mut md = format!("# prefix-harness reproduction: {name}\n\n");
    let failing = results.iter().filter(|r| r.diagnosis.is_some()).count();
    md += &format!(
        "{} case(s); {} ended with a diagnosis; {} met the scenario's expectation.\n\n",
        results.len(),
        failing,
        results.iter().filter(|r| r.status == Status::Pass).count()
    );
    for (c, r) in cases.iter().zip(results) {
        md += &case_markdown(c, r);
    }
    md += &format!(
        "## Scenario (`{}`)\n\n```yaml\n{}\n```\n\n",
        scenario::slash(file),
        text.trim_end()
    );
    md += "## Environment\n\n| os | arch | cpu features | rustc | candle | prefix-harness |\n|---|---|---|---|---|---|\n";
    md += &format!(
        "| {} | {} | {} | {} | {} | {} |\n\n",
        env.os,
        env.arch,
        env.cpu_features.join(" "),
        env.rustc,
        env.candle,
        env!("CARGO_PKG_VERSION")
    );
    let flags: String = flags.iter().map(|f| format!("{f} ")).collect();
    md += &format!(
        "## Reproduce\n\n```sh\nprefix-harness repro {flags}{}\n```\n",
        scenario::slash(file)
    );
    md
}

/// Does `r` fail the same way as `target` (same class and place)?
fn same_failure(target: &Diagnosis, r: &CaseResult) -> bool {
    r.diagnosis.as_ref().is_some_and(|d| {
        d.class == target.class
            && d.layer == target.layer
            && d.attention == target.attention
            && d.tensor == target.tensor
    })
}

/// Shrink a failing case: repeatedly lower P, batch, prompt length, new tokens and the
/// number of layers while the case still fails with the same diagnosis. Returns the
/// smallest case found and the number of runs it took.
pub fn shrink(case: &Case, target: &Diagnosis) -> (Case, usize) {
    let mut best = case.clone();
    let mut runs = 0;
    loop {
        let mut improved = false;
        for knob in 0..5 {
            let current = knob_value(&best, knob);
            for candidate in candidates(current) {
                let mut trial = best.clone();
                set_knob(&mut trial, knob, candidate);
                if scenario::validate(&trial.scenario, &trial.dir).is_err() {
                    continue;
                }
                runs += 1;
                if same_failure(target, &run_case(&trial)) {
                    best = trial;
                    improved = true;
                    break;
                }
            }
        }
        if !improved || runs > 400 {
            return (best, runs);
        }
    }
}

/// Smaller values to try, smallest first: 1, then halving towards `v`.
fn candidates(v: usize) -> Vec<usize> {
    let mut c = vec![];
    let mut x = 1;
    while x < v {
        c.push(x);
        x = (x * 2).max(x + 1);
    }
    if v > 1 && !c.contains(&(v - 1)) {
        c.push(v - 1);
    }
    c
}

fn knob_value(c: &Case, knob: usize) -> usize {
    let s = &c.scenario;
    match knob {
        0 => s.prefix.virtual_tokens,
        1 => s.data.batch_size,
        2 => s.data.max_prompt_len,
        3 => s.generate.max_new_tokens,
        _ => c
            .model_config()
            .map(|m| m.geometry().num_layers)
            .unwrap_or(1),
    }
}

fn set_knob(c: &mut Case, knob: usize, v: usize) {
    let s = &mut c.scenario;
    match knob {
        0 if s.prefix.adapter.is_none() => s.prefix.virtual_tokens = v,
        1 => s.data.batch_size = v,
        2 => s.data.max_prompt_len = v,
        3 => s.generate.max_new_tokens = v,
        4 => {
            // Only tiny seeded models can lose layers; checkpoints keep theirs.
            if let Some(f) = s.model.family {
                s.model
                    .config
                    .insert(f.layers_field().to_string(), serde_json::Value::from(v));
            }
        }
        _ => {}
    }
}

/// The shrunk case as a scenario file: no matrix, and a name of its own
/// ([`shrunk_name`]) so that it never shares a case id with the file it came from.
/// The header names the original by file name only (no absolute path leaks into a
/// public bug report).
pub fn to_yaml(case: &Case) -> Result<String, String> {
    let mut s = case.scenario.clone();
    s.matrix.clear();
    s.name = shrunk_name(&case.id);
    s.description = format!("shrunk from `{}`: {}", case.id, s.description);
    let body = serde_saphyr::to_string(&s).map_err(|e| e.to_string())?;
    let from = std::path::Path::new(&case.file)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(format!(
        "# Shrunk by `prefix-harness repro --shrink` from {from}\n{body}"
    ))
}

/// The name of a shrunk case: the original case id with every character other than
/// ASCII letters, digits and `-` as `_`, then `-shrunk`, within the name length limit.
pub fn shrunk_name(id: &str) -> String {
    const SUFFIX: &str = "-shrunk";
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(crate::harness::scenario::MAX_NAME_CHARS - SUFFIX.len())
        .collect();
    format!("{}{SUFFIX}", safe.trim_end_matches('_'))
}
