//! Running the driver (`driver.py`) and reading what it reports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::expect::version_matches;
use super::{Job, JobCase, DRIVER, PROTOCOL, PYTHON_ENV};
use crate::engine::trace::CacheShapes;

/// The installed versions, as the driver's first line reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StackEnv {
    pub python: Option<String>,
    pub torch: Option<String>,
    pub transformers: Option<String>,
    pub peft: Option<String>,
    pub safetensors: Option<String>,
}

impl StackEnv {
    /// `torch 2.5.1, transformers 4.46.3, peft 0.12.0`.
    pub fn describe(&self) -> String {
        let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "?".into());
        format!(
            "torch {}, transformers {}, peft {}",
            v(&self.torch),
            v(&self.transformers),
            v(&self.peft)
        )
    }

    /// The version of `package` (`torch`, `transformers`, `peft`, `python`).
    pub fn version(&self, package: &str) -> Option<&str> {
        match package {
            "python" => self.python.as_deref(),
            "torch" => self.torch.as_deref(),
            "transformers" => self.transformers.as_deref(),
            "peft" => self.peft.as_deref(),
            "safetensors" => self.safetensors.as_deref(),
            _ => None,
        }
    }

    /// Known inconsistent pairs of the installed versions, as warnings.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = vec![];
        let (Some(t), Some(p)) = (self.transformers.as_deref(), self.peft.as_deref()) else {
            return out;
        };
        if version_matches(t, ">=4.44").unwrap_or(false)
            && version_matches(p, "<0.13").unwrap_or(false)
        {
            out.push(format!(
                "peft {p} with transformers {t}: PEFT < 0.13 hands prefixes over as legacy tuples that transformers >= 4.44 converts to a DynamicCache (PEFT issue 2192: Bloom fails with `Tensors must have same number of dimensions`); install peft >= 0.13 or transformers < 4.44"
            ));
        }
        out
    }
}

/// An exception the stack raised: type, message and the innermost frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StackError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub file: Option<String>,
    pub line: Option<u64>,
    pub function: Option<String>,
}

impl std::fmt::Display for StackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let (Some(file), Some(line)) = (&self.file, self.line) {
            write!(f, " ({file}:{line}")?;
            if let Some(func) = &self.function {
                write!(f, " in {func}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// One cache update as the driver saw it (shapes as stored by the stack's cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackEvent {
    pub step: usize,
    pub layer: usize,
    /// `self` or `cross`.
    pub attention: String,
    /// `seed` or `update`.
    pub op: String,
    #[serde(flatten)]
    pub shapes: CacheShapes,
    #[serde(default)]
    pub failed: bool,
}

/// One phase of a case on the stack (forward, recompute, generate, cached).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phase {
    pub tokens: Option<Vec<Vec<u32>>>,
    /// `[B, V]`: the last position's logits of the PEFT forward.
    pub logits_last: Option<Vec<Vec<f64>>>,
    pub events: Vec<StackEvent>,
    pub error: Option<StackError>,
    /// `false` for sampling: torch's generator is not ours.
    pub tokens_comparable: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainPhase {
    pub losses: Vec<f64>,
    pub error: Option<StackError>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    pub forward: Option<Phase>,
    pub recompute: Option<Phase>,
    pub generate: Option<Phase>,
    pub cached: Option<Phase>,
    pub train: Option<TrainPhase>,
}

/// One case as the stack ran it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StackCase {
    pub id: String,
    /// `ok`, `skip` or `error`.
    pub status: String,
    pub reason: Option<String>,
    #[serde(default)]
    pub duration_ms: f64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub phases: Phases,
    pub error: Option<StackError>,
}

/// `null` read as the type's default (the driver writes `"phases": null` for a case
/// it could not set up).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl StackCase {
    /// A case the driver never reported (crash, time-out, malformed output).
    pub fn failed(id: &str, reason: String) -> Self {
        Self {
            id: id.to_string(),
            status: "error".into(),
            reason: Some(reason),
            duration_ms: 0.0,
            phases: Phases::default(),
            error: None,
        }
    }

    /// The stack's first exception, in the order that decides the outcome: the PEFT
    /// forward (it records the cache updates, so its failure has a place), training,
    /// `generate`, decoding from PEFT's cache, recomputation.
    pub fn first_error(&self) -> Option<(&'static str, &StackError, &[StackEvent])> {
        let p = &self.phases;
        let forward = p.forward.as_ref().and_then(|ph| {
            ph.error
                .as_ref()
                .map(|e| ("forward", e, ph.events.as_slice()))
        });
        let train = p
            .train
            .as_ref()
            .and_then(|t| t.error.as_ref())
            .map(|e| ("train", e, &[][..]));
        forward.or(train).or_else(|| {
            [
                ("generate", &p.generate),
                ("cached", &p.cached),
                ("recompute", &p.recompute),
            ]
            .into_iter()
            .find_map(|(name, ph)| {
                let ph = ph.as_ref()?;
                ph.error.as_ref().map(|e| (name, e, ph.events.as_slice()))
            })
        })
    }
}

/// How the driver is run.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub python: PathBuf,
    /// Per-case limit (the first case also gets `startup` for importing torch).
    pub timeout: Option<Duration>,
    /// Time for the driver to start (imports) before the first case's clock runs;
    /// default [`STARTUP`].
    pub startup: Duration,
}

/// Time allowed for the driver to start (imports) before the first case's clock runs.
pub const STARTUP: Duration = Duration::from_secs(120);

/// What one job gave: the environment line and a result per case, in job order.
#[derive(Debug, Clone, Default)]
pub struct JobOutput {
    pub env: Option<StackEnv>,
    pub cases: Vec<StackCase>,
    /// Wall time of the driver processes.
    pub wall: Duration,
}

enum Line {
    Text(String),
    Eof,
}

/// Run the driver on `job` (written into `dir`), restarting it after a crash or a
/// time-out so that every case gets a result.
pub fn run_job(job: &Job, dir: &Path, opts: &StackOptions) -> JobOutput {
    let start = Instant::now();
    let mut out = JobOutput::default();
    let driver = dir.join("driver.py");
    if let Err(e) = std::fs::write(&driver, DRIVER) {
        out.cases = job
            .cases
            .iter()
            .map(|c| StackCase::failed(&c.id, format!("cannot write the driver: {e}")))
            .collect();
        return out;
    }
    let mut rest: Vec<JobCase> = job.cases.clone();
    let mut round = 0;
    while !rest.is_empty() {
        round += 1;
        let path = dir.join(format!("job-{round}.json"));
        let sub = Job {
            protocol: PROTOCOL,
            cases: rest.clone(),
        };
        let text = serde_json::to_string(&sub).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, text) {
            out.cases.extend(
                rest.iter()
                    .map(|c| StackCase::failed(&c.id, format!("cannot write the job: {e}"))),
            );
            break;
        }
        let (done, env) = run_driver(&driver, &path, &rest, opts);
        if out.env.is_none() {
            out.env = env;
        }
        let n = done.len();
        out.cases.extend(done);
        rest.drain(..n.min(rest.len()));
    }
    out.wall = start.elapsed();
    out
}

/// One driver process over `cases`: the results it gave, in order, ending with the
/// case it failed on (crash or time-out) if it did.
fn run_driver(
    driver: &Path,
    job: &Path,
    cases: &[JobCase],
    opts: &StackOptions,
) -> (Vec<StackCase>, Option<StackEnv>) {
    let python = &opts.python;
    let spawned = Command::new(python)
        .arg(driver)
        .arg(job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child: Child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let why = format!(
                "cannot start the Python interpreter `{}`: {e} (give one with --python or {PYTHON_ENV})",
                python.display()
            );
            return (
                cases
                    .iter()
                    .map(|c| StackCase::failed(&c.id, why.clone()))
                    .collect(),
                None,
            );
        }
    };
    let (tx, rx) = mpsc::channel::<Line>();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    // stderr is read on its own thread and handed over through a channel: a process
    // the driver started may keep the pipe open after the driver is killed.
    let (err_tx, err_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        let _ = err_tx.send(text);
    });
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for l in lines.by_ref() {
            match l {
                Ok(l) => {
                    if tx.send(Line::Text(l)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = (tx.send(Line::Eof), e);
                    return;
                }
            }
        }
        let _ = tx.send(Line::Eof);
    });
    let mut env = None;
    let mut done: Vec<StackCase> = vec![];
    let mut limit = opts.timeout.map(|t| t + opts.startup);
    let mut failure: Option<String> = None;
    while done.len() < cases.len() {
        let id = &cases[done.len()].id;
        let got = match limit {
            Some(l) => rx.recv_timeout(l),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(Line::Text(l)) if l.trim().is_empty() => continue,
            Ok(Line::Text(l)) => {
                let v: serde_json::Value = match serde_json::from_str(&l) {
                    Ok(v) => v,
                    Err(e) => {
                        failure = Some(format!(
                            "the driver printed a line that is not JSON ({e}): {}",
                            shorten(&l, 200)
                        ));
                        break;
                    }
                };
                if let Some(e) = v.get("environment") {
                    env = serde_json::from_value(e.clone()).ok();
                    continue;
                }
                match serde_json::from_value::<StackCase>(v) {
                    Ok(c) if &c.id == id => {
                        done.push(c);
                        limit = opts.timeout;
                    }
                    Ok(c) => {
                        failure = Some(format!(
                            "the driver reported case `{}` where `{id}` was due",
                            c.id
                        ));
                        break;
                    }
                    Err(e) => {
                        failure = Some(format!(
                            "the driver's result is malformed ({e}): {}",
                            shorten(&l, 200)
                        ));
                        break;
                    }
                }
            }
            Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                failure = Some(String::new());
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failure = Some(format!(
                    "timed out after {:.0} s on the stack (--timeout)",
                    limit.unwrap_or_default().as_secs_f64()
                ));
                break;
            }
        }
    }
    let _ = child.kill();
    let status = child.wait().ok();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_default();
    if let Some(why) = failure {
        let why = if why.is_empty() {
            let code = status
                .and_then(|s| s.code())
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| "killed".into());
            let tail = last_lines(&stderr, 6);
            format!("the driver stopped before reporting this case ({code}): {tail}")
        } else {
            why
        };
        if let Some(c) = cases.get(done.len()) {
            done.push(StackCase::failed(&c.id, why));
        }
    }
    (done, env)
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    s.chars().take(n).collect::<String>() + "..."
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        "no message on stderr".into()
    } else {
        shorten(&tail, 600)
    }
}
