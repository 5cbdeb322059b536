//! The `prefix-harness` command: parses arguments and delegates to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use prefix_harness::harness::report::{self, Environment, Summary};
use prefix_harness::harness::run::{self, CaseResult, RunOptions};
use prefix_harness::harness::scenario::{self, Case, InputError};
use prefix_harness::harness::stack::StackOptions;

#[derive(Parser)]
#[command(
    name = "prefix-harness",
    version,
    about = "Reproduce prefix-tuning runs and catch KV-cache shape regressions"
)]
struct Cli {
    /// Let relative paths in scenario files point outside the scenario's folder.
    #[arg(long, global = true)]
    allow_outside_paths: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files or folders (default: scenarios/).
    Run(RunArgs),
    /// Parse and check scenario files without running them.
    Validate {
        #[arg(default_value = "scenarios")]
        paths: Vec<PathBuf>,
    },
    /// Reproduce a scenario and write a Markdown bug report (stdout or --output).
    Repro {
        /// The scenario file.
        file: PathBuf,
        /// Write the report here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Shrink each failing case to the smallest one that fails the same way and
        /// write it as FILE.shrunk.yaml beside the scenario.
        #[arg(long)]
        shrink: bool,
        /// Also run the cases on the Python stack (see `run --against`).
        #[arg(long, value_enum)]
        against: Option<Against>,
        /// The Python interpreter for --against.
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Compare two fingerprint files (`run --fingerprint`): shapes, statuses and tokens
    /// exactly, losses and logits within tolerance. Exit 0 equivalent, 1 different,
    /// 2 unreadable input.
    Compare {
        /// Fingerprint A (e.g. the Linux run).
        a: PathBuf,
        /// Fingerprint B (e.g. the Windows run).
        b: PathBuf,
        /// Relative tolerance for numbers: |a-b| <= atol + rtol * max(|a|, |b|).
        #[arg(long, default_value_t = prefix_harness::harness::fingerprint::DEFAULT_RTOL)]
        rtol: f64,
        /// Absolute tolerance for numbers (the floor near zero).
        #[arg(long, default_value_t = prefix_harness::harness::fingerprint::DEFAULT_ATOL)]
        atol: f64,
    },
    /// Print the expanded case ids.
    List {
        #[arg(default_value = "scenarios")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        only: CaseFilter,
    },
}

/// Which of the loaded cases a command keeps (`--filter`, `--tag`).
#[derive(clap::Args)]
struct CaseFilter {
    /// Only cases whose id contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Only scenarios with this tag.
    #[arg(long)]
    tag: Option<String>,
}

impl CaseFilter {
    fn apply(&self, cases: Vec<Case>) -> Vec<Case> {
        let (filter, tag) = (self.filter.as_deref(), self.tag.as_deref());
        cases
            .into_iter()
            .filter(|c| filter.is_none_or(|f| c.id.contains(f)))
            .filter(|c| tag.is_none_or(|t| c.scenario.tags.iter().any(|x| x == t)))
            .collect()
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Files, folders (searched for .yaml/.yml) or glob patterns.
    #[arg(default_value = "scenarios")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    only: CaseFilter,
    /// Run shard I of N (1-based), e.g. 2/3: every case lands in exactly one shard.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Cases run in parallel (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Per-case time limit in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Stop starting cases after the first that does not meet its expectation.
    #[arg(long)]
    fail_fast: bool,
    /// Per-case memory budget in MiB; a case estimated above it is refused before
    /// anything is allocated.
    #[arg(long, default_value_t = 8192)]
    max_memory: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write a JUnit XML report here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Write a fingerprint (trace digests and events, tokens, losses, logits
    /// summaries, environment) here, for `compare`.
    #[arg(long)]
    fingerprint: Option<PathBuf>,
    /// Also run every case on the Python stack and compare: `peft` (torch +
    /// transformers + PEFT of the interpreter given by --python).
    #[arg(long, value_enum)]
    against: Option<Against>,
    /// The Python interpreter for --against (default: $PREFIX_HARNESS_PYTHON, else
    /// python3).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// What `--against` compares the engine with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Against {
    /// torch + transformers + PEFT, through the embedded driver.
    Peft,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 2/3")?;
    let i: usize = i
        .trim()
        .parse()
        .map_err(|_| format!("`{i}` is not a number"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a number"))?;
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: expected 1 <= I <= N"));
    }
    Ok((i, n))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let load = scenario::LoadOptions {
        allow_outside_paths: cli.allow_outside_paths,
    };
    match cli.command {
        Command::Validate { paths } => match load_all(&paths, load) {
            Ok(cases) => {
                println!("{} cases, all valid", cases.len());
                ExitCode::SUCCESS
            }
            Err(errors) => invalid(&errors),
        },
        Command::List { paths, only } => match load_all(&paths, load) {
            Ok(cases) => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for c in only.apply(cases) {
                    // A closed pipe (`list | head`) ends the listing quietly.
                    if writeln!(out, "{}", c.id).is_err() {
                        break;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(errors) => invalid(&errors),
        },
        Command::Run(args) => run_command(args, load),
        Command::Compare { a, b, rtol, atol } => compare_command(&a, &b, rtol, atol),
        Command::Repro {
            file,
            output,
            shrink,
            against,
            python,
        } => {
            let stack = (against == Some(Against::Peft)).then(|| StackOptions {
                python: prefix_harness::harness::stack::interpreter(python.as_deref()),
                timeout: Some(Duration::from_secs(300)),
                startup: prefix_harness::harness::stack::STARTUP,
            });
            repro_command(&file, output.as_deref(), shrink, stack.as_ref(), load)
        }
    }
}

fn compare_command(a: &std::path::Path, b: &std::path::Path, rtol: f64, atol: f64) -> ExitCode {
    use prefix_harness::harness::fingerprint::{compare_files, Tolerance};
    if !(rtol >= 0.0 && atol >= 0.0) {
        eprintln!("error: --rtol and --atol must be non-negative numbers");
        return ExitCode::from(2);
    }
    match compare_files(a, b, Tolerance { rtol, atol }) {
        Ok(c) => {
            print!("{}", c.render());
            if c.is_equivalent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn repro_command(
    file: &std::path::Path,
    output: Option<&std::path::Path>,
    shrink: bool,
    stack: Option<&StackOptions>,
    load: scenario::LoadOptions,
) -> ExitCode {
    let cases = match scenario::load_with(file, load) {
        Ok(c) => c,
        Err(e) => return invalid(&[e]),
    };
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut results: Vec<CaseResult> = cases.iter().map(|c| run::run_isolated(c, None)).collect();
    if let Some(opts) = stack {
        prefix_harness::harness::stack::run_against(&cases, &mut results, opts, &|l| {
            eprintln!("{l}")
        });
    }
    let env = Environment::capture(1);
    // The flags that changed what ran, for the report's "Reproduce" command.
    let flags: Vec<&str> = [
        load.allow_outside_paths.then_some("--allow-outside-paths"),
        stack.map(|_| "--against peft"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut md =
        prefix_harness::harness::repro::markdown(file, &text, &cases, &results, &env, &flags);
    let mut status = if Summary::of(&results).ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if shrink {
        for (case, r) in cases.iter().zip(&results) {
            let Some(d) = &r.diagnosis else { continue };
            eprintln!("shrinking {} ...", case.id);
            let (small, runs) = prefix_harness::harness::repro::shrink(case, d);
            let target = file.with_extension("shrunk.yaml");
            let target = if cases.len() > 1 {
                let stem = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                let safe = prefix_harness::harness::repro::shrunk_name(&case.id);
                file.with_file_name(format!("{stem}.{safe}.yaml"))
            } else {
                target
            };
            match prefix_harness::harness::repro::to_yaml(&small)
                .map_err(|e| e.to_string())
                .and_then(|y| report::write_atomic(&target, &y).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    let s = &small.scenario;
                    md += &format!(
                        "\n## Shrunk `{}` ({runs} runs)\n\nStill fails with `{}` at {}: P = {}, batch {}, prompt <= {} tokens, {} new tokens, {} layers. Written to `{}`.\n",
                        case.id,
                        d.class.as_str(),
                        d.place(),
                        s.prefix.virtual_tokens,
                        s.data.batch_size,
                        s.data.max_prompt_len,
                        s.generate.max_new_tokens,
                        small.model_config().map(|m| m.geometry().num_layers).unwrap_or(0),
                        scenario::slash(&target)
                    );
                }
                Err(e) => {
                    eprintln!("error: cannot write {}: {e}", target.display());
                    status = ExitCode::from(2);
                }
            }
        }
    }
    match output {
        Some(p) => {
            if let Err(e) = report::write_atomic(p, &md) {
                eprintln!("error: cannot write {}: {e}", p.display());
                return ExitCode::from(2);
            }
            eprintln!("wrote {}", p.display());
        }
        None => print!("{md}"),
    }
    status
}

fn invalid(errors: &[InputError]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    eprintln!("{} invalid scenario file(s); nothing was run", errors.len());
    ExitCode::from(2)
}

/// Every case of every file, or every input error; `load` is the command line's
/// loading options (`--allow-outside-paths`).
fn load_all(paths: &[PathBuf], load: scenario::LoadOptions) -> Result<Vec<Case>, Vec<InputError>> {
    let files = scenario::discover(paths).map_err(|e| vec![e])?;
    let mut cases = vec![];
    let mut errors = vec![];
    for f in &files {
        match scenario::load_with(f, load) {
            Ok(c) => cases.extend(c),
            Err(e) => errors.push(e),
        }
    }
    // Case ids key snapshots, fingerprints and `compare`: two cases with one id (two
    // files with one `name`) would be matched with each other's results.
    let mut seen: std::collections::HashMap<&str, &Case> = Default::default();
    for c in &cases {
        if let Some(first) = seen.insert(&c.id, c) {
            errors.push(InputError {
                file: PathBuf::from(&c.file),
                line: None,
                column: None,
                field: "name".into(),
                message: format!(
                    "the case id `{}` is also a case of {}; case ids must be unique across a run (give one of the scenarios another `name`)",
                    c.id, first.file
                ),
            });
        }
    }
    if files.is_empty() {
        errors.push(InputError {
            file: paths.first().cloned().unwrap_or_default(),
            line: None,
            column: None,
            field: String::new(),
            message: "no scenario files (.yaml, .yml) found".into(),
        });
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors)
    }
}

fn run_command(args: RunArgs, load: scenario::LoadOptions) -> ExitCode {
    let cases = match load_all(&args.paths, load) {
        Ok(c) => c,
        Err(errors) => return invalid(&errors),
    };
    let mut cases = args.only.apply(cases);
    if let Some((i, n)) = args.shard {
        cases = run::shard(&cases, i, n);
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    run::prepare_process(jobs);
    let opts = RunOptions {
        jobs,
        timeout: (args.timeout > 0.0).then(|| Duration::from_secs_f64(args.timeout)),
        fail_fast: args.fail_fast,
        max_memory: args.max_memory.saturating_mul(1 << 20),
    };
    let total = cases.len();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} {msg}")
                .expect("progress template"),
        );
        b
    });
    let done = std::sync::atomic::AtomicUsize::new(0);
    let on_done = |r: &CaseResult| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        match &bar {
            Some(b) => {
                b.set_message(format!("{} {}", r.status.as_str(), r.id));
                b.inc(1);
            }
            None => eprintln!(
                "[{n}/{total}] {} {} ({:.0} ms)",
                r.status.as_str(),
                r.id,
                r.duration_ms
            ),
        }
    };
    let mut results = run::run_all(&cases, &opts, &on_done);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if args.against == Some(Against::Peft) {
        let stack_opts = StackOptions {
            python: prefix_harness::harness::stack::interpreter(args.python.as_deref()),
            timeout: opts.timeout,
            startup: prefix_harness::harness::stack::STARTUP,
        };
        let n = results.len();
        let rep = prefix_harness::harness::stack::run_against(
            &cases[..n],
            &mut results,
            &stack_opts,
            &|line| eprintln!("{line}"),
        );
        if let Some(env) = &rep.env {
            eprintln!(
                "stack: python {} ({}), {}",
                env.python.as_deref().unwrap_or("?"),
                stack_opts.python.display(),
                env.describe()
            );
            for w in env.warnings() {
                eprintln!("warning: {w}");
            }
        }
        eprintln!(
            "stack: driver {:.1} s, harness {:.2} s ({:.1}% of the stack's wall time)",
            rep.driver_wall.as_secs_f64(),
            rep.harness_wall.as_secs_f64(),
            100.0 * rep.harness_wall.as_secs_f64()
                / (rep.driver_wall + rep.harness_wall).as_secs_f64().max(1e-9)
        );
    }
    print!("{}", report::table(&results));
    let env = Environment::capture(jobs);
    let mut status = if Summary::of(&results).ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if let Some(p) = &args.report {
        if let Err(e) = report::write_atomic(p, &report::json(&results, env.clone())) {
            eprintln!("error: cannot write the report {}: {e}", p.display());
            status = ExitCode::from(2);
        }
    }
    if let Some(p) = &args.fingerprint {
        let fp =
            prefix_harness::harness::fingerprint::Fingerprint::from_results(&results, env.clone());
        if let Err(e) = fp.write(p) {
            eprintln!("error: cannot write the fingerprint {}: {e}", p.display());
            status = ExitCode::from(2);
        }
    }
    if let Some(p) = &args.junit {
        if let Err(e) = report::write_atomic(p, &report::junit(&results)) {
            eprintln!("error: cannot write the JUnit file {}: {e}", p.display());
            status = ExitCode::from(2);
        }
    }
    if results.len() < total {
        eprintln!(
            "--fail-fast: stopped after a case did not meet its expectation ({} of {total} cases run)",
            results.len()
        );
    }
    status
}
