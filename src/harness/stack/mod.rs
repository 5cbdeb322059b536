//! Running cases on the real Python stack (torch + transformers + PEFT) next to the
//! engine: `prefix-harness run PATHS --against peft`.
//!
//! The pipeline, per scenario file:
//! 1. [`export_case`]: what the engine runs on, as files the stack reads: a Hugging Face
//!    model folder (seeded models are written with transformers' parameter names; a
//!    checkpoint's folder is handed over as it is), a PEFT adapter (the scenario's, or
//!    the engine's untrained prefix written by [`crate::io::adapter::save`]), and the prompt
//!    batch, the training batches and the generation settings as JSON ([`JobCase`]).
//! 2. [`run_job`]: the driver (`src/harness/stack/driver.py`, embedded in the binary and written
//!    to a temporary folder) runs once for all cases of the file and prints one JSON
//!    line per case ([`StackCase`]); a case over the time limit is killed and the driver
//!    restarted for the rest.
//! 3. [`verdict`]: the two sides compared: `agree`, `stack-fails` (the stack's exception
//!    read as one of our [`Diagnosis`](crate::engine::diagnosis::Diagnosis) classes), `engine-fails`, `diverges` (the first
//!    differing token, loss or cache event), or `skip` / `error`.
//! 4. [`judge_stack`]: the verdict against the scenario's `expect_stack` (default
//!    `agree`), by the installed versions.

mod driver;
mod expect;
mod job;
pub(crate) mod verdict;

pub use driver::{
    run_job, JobOutput, Phase, Phases, StackCase, StackEnv, StackError, StackEvent, StackOptions,
    TrainPhase, STARTUP,
};
pub use expect::{
    expectation_for, judge_stack, validate_expectations, version_matches, StackExpect,
    StackExpectation, StackWord, PACKAGES,
};
pub use job::{export_case, write_model, Job, JobBatch, JobCache, JobCase, JobGenerate, JobTrain};
pub use verdict::{
    diagnose, loss_tolerance, same_failure, verdict, Divergence, StackOutcome, VerdictKind,
    LOGITS_ATOL, LOGITS_RTOL,
};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::run::CaseResult;
use crate::harness::scenario::Case;

/// The driver, embedded at build time.
pub const DRIVER: &str = include_str!("driver.py");
/// The job format the driver reads (its docstring is the specification).
pub const PROTOCOL: u32 = 1;
/// Environment variable naming the interpreter when `--python` is not given.
pub const PYTHON_ENV: &str = "PREFIX_HARNESS_PYTHON";

/// The interpreter: `--python`, else `PREFIX_HARNESS_PYTHON`, else `python3`.
pub fn interpreter(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(PYTHON_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

// ---------------------------------------------------------------------------------
// The whole run

/// What `--against peft` measured, for the summary.
#[derive(Debug, Clone, Default)]
pub struct AgainstReport {
    pub env: Option<StackEnv>,
    /// Wall time of the driver processes, summed over files.
    pub driver_wall: Duration,
    /// The harness's own time: exporting cases and comparing.
    pub harness_wall: Duration,
}

/// Run every case of `cases` on the stack, one driver process per scenario file, and
/// fold the verdicts into `results` (same order as `cases`): a case passes when the
/// engine met its `expect` and the stack its `expect_stack`. `progress` gets a line per
/// file and per case.
pub fn run_against(
    cases: &[Case],
    results: &mut [CaseResult],
    opts: &StackOptions,
    progress: &dyn Fn(&str),
) -> AgainstReport {
    let mut report = AgainstReport::default();
    let mut files: Vec<&str> = vec![];
    for c in cases {
        if !files.contains(&c.file.as_str()) {
            files.push(&c.file);
        }
    }
    for file in files {
        let idx: Vec<usize> = (0..cases.len().min(results.len()))
            .filter(|&i| cases[i].file == file)
            .collect();
        progress(&format!("stack: {file} ({} cases)", idx.len()));
        let t0 = Instant::now();
        let scratch = match Scratch::new("job") {
            Ok(s) => s,
            Err(e) => {
                for &i in &idx {
                    fold(
                        &cases[i],
                        &mut results[i],
                        error_outcome(format!("cannot create a temporary folder: {e}")),
                    );
                }
                continue;
            }
        };
        let mut job = Job {
            protocol: PROTOCOL,
            cases: vec![],
        };
        let mut exported: Vec<usize> = vec![];
        for (n, &i) in idx.iter().enumerate() {
            let case = &cases[i];
            if results[i].status == crate::harness::run::Status::Skip && results[i].trace.is_none()
            {
                continue;
            }
            if case.scenario.cache.mode == crate::harness::scenario::CacheModeName::Quantized {
                let why = "cache mode quantized: the engine compares it with its own unquantized run; transformers' QuantizedCache needs the optimum-quanto or HQQ backend and quantizes in other groups and at other times";
                let o = StackOutcome::new(VerdictKind::Skip, why.into(), StackEnv::default());
                fold(case, &mut results[i], o);
                continue;
            }
            let dir = scratch.0.join(format!("case-{n}"));
            let made = crate::harness::run::prepare_with(case, false)
                .map_err(|e| e.to_string())
                .and_then(|p| export_case(case, &p, &dir, opts.timeout));
            match made {
                Ok(j) => {
                    job.cases.push(j);
                    exported.push(i);
                }
                Err(e) => fold(
                    case,
                    &mut results[i],
                    error_outcome(format!("cannot hand the case to the stack: {e}")),
                ),
            }
        }
        let mut harness = t0.elapsed();
        if job.cases.is_empty() {
            report.harness_wall += harness;
            continue;
        }
        let out = run_job(&job, &scratch.0, opts);
        report.driver_wall += out.wall;
        let t1 = Instant::now();
        let env = out.env.clone().unwrap_or_default();
        if report.env.is_none() {
            report.env = out.env.clone();
        }
        for (k, &i) in exported.iter().enumerate() {
            let s = out.cases.get(k).cloned().unwrap_or_else(|| {
                StackCase::failed(&cases[i].id, "no result from the driver".into())
            });
            let o = verdict(&cases[i], &results[i], results[i].raised, &s, &env);
            progress(&format!("  {} {}", o.verdict.as_str(), cases[i].id));
            fold(&cases[i], &mut results[i], o);
        }
        harness += t1.elapsed();
        report.harness_wall += harness;
    }
    report
}

fn error_outcome(detail: String) -> StackOutcome {
    StackOutcome::new(VerdictKind::Error, detail, StackEnv::default())
}

/// Fold the stack's outcome into the case's result: an error on the stack is the
/// case's error, a skip keeps the engine's status, otherwise the outcome is judged
/// against `expect_stack`.
fn fold(case: &Case, r: &mut CaseResult, o: StackOutcome) {
    use crate::harness::run::Status;
    let want = expectation_for(&case.scenario.expect_stack, &case.id, &o.versions);
    let why = judge_stack(&want, &o);
    match (o.verdict, why) {
        (_, None) => {}
        (VerdictKind::Skip, Some(_)) => {}
        (VerdictKind::Error, Some(_)) if r.status != Status::Fail => {
            // The table shows the stack's error from the outcome.
            r.status = Status::Error;
        }
        (_, Some(why)) if r.status == Status::Pass => {
            r.status = Status::Fail;
            r.message = Some(why);
        }
        (_, Some(why)) => {
            let m = r.message.take().unwrap_or_default();
            r.message = Some(if m.is_empty() {
                why
            } else {
                format!("{m}; {why}")
            });
        }
    }
    r.expected = format!("{}; stack {}", r.expected, want.describe());
    r.stack = Some(o);
}

// ---------------------------------------------------------------------------------
// A scratch folder

/// A temporary folder removed on drop (kept when `PREFIX_HARNESS_KEEP_STACK` is set,
/// for debugging the driver).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> std::io::Result<Self> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!(
            "prefix-harness-stack-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("PREFIX_HARNESS_KEEP_STACK").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = writeln!(std::io::stderr(), "kept {}", self.0.display());
        }
    }
}
