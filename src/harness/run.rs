//! Running cases: one case end to end (model, prefix, cache, data, generation), its
//! outcome against the expectation, and a pool that runs many cases in parallel with
//! per-case isolation (errors, panics and time limits stay inside their case).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use serde::Serialize;

use crate::engine::cache::CacheMode;
use crate::engine::diagnosis::{Diagnosis, DiagnosisClass, EngineError};
use crate::engine::generate::{DecodeOptions, Generation};
use crate::engine::prefix::PrefixEncoder;
use crate::engine::trace::Trace;
use crate::harness::scenario::{Case, Expect};

/// Process-wide settings for running cases with `jobs` worker threads; call once, at
/// start-up, before any other thread exists (it sets environment variables).
///
/// - `RAYON_NUM_THREADS`, unless the user set it: 1 per case when cases run in
///   parallel (tiny tensors do not pay for threads), else all cores. Always set, because when it is unset candle 0.11 parses /proc/cpuinfo on
///   every matmul to find the thread count (about 40% of a tiny run, ci/bench/README.md).
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless the user set it: 200. candle 0.11 runs
///   its element-wise ops on a pool of its own besides rayon's, whose idle threads spin
///   25 000 times (about a millisecond) after each op before they sleep. In a training
///   step that spin took 6% of the CPU time, on cores that the matmuls' rayon threads
///   were waiting for; a short spin made the step about 7% faster (ci/bench/README.md).
/// - On glibc, keep freed memory for reuse ([`keep_freed_memory`]).
pub fn prepare_process(jobs: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = if jobs > 1 {
            1
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        };
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
    keep_freed_memory();
}

/// Every tensor op allocates a fresh buffer of up to a few MiB. glibc serves those with
/// `mmap` and returns them to the kernel on free, so every op paid page faults and page
/// zeroing again (15-25% of a compute-bound training step, ci/bench/README.md). Raise
/// the mmap threshold to its maximum (32 MiB) and stop trimming the heap: freed buffers
/// are reused. Peak RSS is unchanged (the peak is live tensors); RSS stays at the peak.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Other allocators keep freed memory by default.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}

/// The outcome of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The case met its expectation (an expected failure that happened counts).
    Pass,
    /// It did not: an unexpected diagnosis, another diagnosis, or no failure at all.
    Fail,
    /// Not meant for this platform.
    Skip,
    /// It could not be run: invalid model config, engine error, panic, time limit.
    Error,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Skip => "skip",
            Status::Error => "error",
        }
    }
}

/// Everything a report says about one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub scenario: String,
    pub status: Status,
    pub expected: String,
    pub duration_ms: f64,
    pub diagnosis: Option<Diagnosis>,
    /// Warning-level diagnoses of a run that completed (e.g. `prefix-evicted`).
    pub warnings: Vec<Diagnosis>,
    /// Why the case failed, errored or was skipped (None on a pass).
    pub message: Option<String>,
    /// Training loss per step (empty: the case did not train).
    pub losses: Vec<f32>,
    /// Generated ids per batch row.
    pub tokens: Vec<Vec<u32>>,
    /// Next-token logits of every decoding step, summarised (see [`LogitsSummary`]).
    pub logits: Vec<LogitsSummary>,
    /// Digest of the shape trace (None when nothing ran).
    pub trace_digest: Option<String>,
    /// The same case on the Python stack (`run --against peft`), compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: Option<crate::harness::stack::StackOutcome>,
    /// `cache.mode: quantized`: token agreement and logit drift against the same case
    /// run unquantized (`dynamic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<crate::engine::divergence::QuantReport>,
    #[serde(skip)]
    pub trace: Option<Trace>,
    /// Whether the engine run ended in an error (a diagnosis that stopped it), whatever
    /// the expectation said.
    #[serde(skip)]
    pub raised: bool,
}

impl CaseResult {
    fn new(case: &Case, status: Status) -> Self {
        Self::blank(
            case.id.clone(),
            case.file.clone(),
            status,
            case.expect().describe(),
        )
    }

    /// A result with the given identity and status that holds nothing else yet.
    pub(crate) fn blank(id: String, scenario: String, status: Status, expected: String) -> Self {
        Self {
            id,
            scenario,
            status,
            expected,
            duration_ms: 0.0,
            diagnosis: None,
            warnings: vec![],
            message: None,
            losses: vec![],
            tokens: vec![],
            logits: vec![],
            trace_digest: None,
            stack: None,
            quantization: None,
            trace: None,
            raised: false,
        }
    }
}

/// A platform-comparable summary of one step's logits `[B, V]`: order statistics and
/// the sum, as f64 so that they round-trip exactly through JSON.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct LogitsSummary {
    pub min: f64,
    pub q25: f64,
    pub median: f64,
    pub q75: f64,
    pub max: f64,
    pub sum: f64,
}

impl LogitsSummary {
    /// Summarise `logits: [B, V]` (any shape works: all values are pooled).
    pub fn of(logits: &candle_core::Tensor) -> candle_core::Result<Self> {
        let v: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self::of_values(v.into_iter().map(f64::from).collect()))
    }

    /// Summarise plain values (the Python stack's logits `[B, V]`, flattened).
    pub fn of_values(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            v[((v.len() - 1) as f64 * q).round() as usize]
        };
        Self {
            min: at(0.0),
            q25: at(0.25),
            median: at(0.5),
            q75: at(0.75),
            max: at(1.0),
            sum: v.iter().sum(),
        }
    }
}

/// Default memory budget of one case (`--max-memory`): 8 GiB.
pub const DEFAULT_MAX_MEMORY: u64 = 8 << 30;

/// Run one case in this thread, with the default memory budget.
pub fn run_case(case: &Case) -> CaseResult {
    run_case_limited(case, DEFAULT_MAX_MEMORY)
}

/// A rough upper estimate of the memory a case needs, in bytes, by part:
/// `(weights, caches, activations)`. Computed from the config before anything is
/// allocated, so that an oversized case is refused instead of killed.
pub fn estimate_memory(case: &Case) -> Result<(u64, u64, u64), String> {
    let cfg = case.model_config()?;
    let g = cfg.geometry();
    let s = &case.scenario;
    // f64 arithmetic: absurd sizes give absurd estimates, never an overflow.
    let f = |x: usize| x as f64;
    let (e, l, v) = (f(g.hidden_size), f(g.num_layers), f(g.vocab_size));
    let (h, kvh, d) = (f(g.num_attention_heads), f(g.num_kv_heads), f(g.head_dim));
    let inner = f(cfg.mlp_width());
    let stacks = if g.encoder_decoder { 3.0 } else { 1.0 }; // encoder, decoder, cross
    let per_layer = 4.0 * e * h * d + 3.0 * e * inner;
    let weights = 4.0 * (2.0 * v * e + stacks * l * per_layer);
    let p = f(s.prefix.virtual_tokens.max(1));
    let rows = f(s.data.batch_size)
        * match &s.generate.strategy {
            crate::engine::generate::Strategy::Beam { num_beams, .. } => f(*num_beams),
            _ => f(s.generate.num_return_sequences),
        };
    let total = p + f(s.data.max_prompt_len) + f(s.generate.max_new_tokens);
    let caches = 4.0 * 2.0 * stacks.min(2.0) * l * rows * kvh * total * d;
    let train_factor = if s.train.is_some() {
        4.0 + 2.0 * l
    } else {
        2.0
    };
    let activations =
        4.0 * train_factor * rows * (3.0 * h * total * total + total * (v + 4.0 * e + inner));
    let bytes = |x: f64| {
        if x >= u64::MAX as f64 {
            u64::MAX
        } else {
            x as u64
        }
    };
    Ok((bytes(weights), bytes(caches), bytes(activations)))
}

/// Run one case in this thread, refusing it when its memory estimate is over
/// `max_memory` bytes.
pub fn run_case_limited(case: &Case, max_memory: u64) -> CaseResult {
    if let Ok((w, c, a)) = estimate_memory(case) {
        if w.saturating_add(c).saturating_add(a) > max_memory {
            let mut r = CaseResult::new(case, Status::Error);
            let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
            r.message = Some(format!(
                "resource guard: the case needs about {:.0} MiB (weights {:.0}, caches {:.0}, activations {:.0}), over the budget of {:.0} MiB (--max-memory)",
                mib(w.saturating_add(c).saturating_add(a)),
                mib(w),
                mib(c),
                mib(a),
                mib(max_memory)
            ));
            return r;
        }
    }
    let start = Instant::now();
    let mut r = CaseResult::new(case, Status::Error);
    if let Some(why) = case.skip_reason() {
        r.status = Status::Skip;
        r.message = Some(why);
        return r;
    }
    let outcome = execute(case, &mut r);
    r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    let ran = outcome.is_ok();
    r.raised = !ran;
    judge(case, outcome, &mut r);
    if ran && r.status == Status::Pass {
        if let Some(why) = extra_checks(case, &r) {
            r.status = Status::Fail;
            r.message = Some(why);
        }
    }
    r
}

/// What a case runs on, built from the scenario before anything runs: the model, its
/// weights by Hugging Face name, the prefix (fresh or a PEFT adapter, untrained), the
/// prompt batch and the decoding options. `run` executes it; `--against peft` hands the
/// same inputs to the Python stack.
pub struct Prepared {
    pub model: Box<dyn crate::engine::model::Model>,
    pub base: crate::engine::train::BaseWeights,
    pub prefix: PrefixEncoder,
    /// Prompt ids `[B, S]` (u32), left-padded with id 0.
    pub ids: candle_core::Tensor,
    /// Prompt padding mask `[B, S]` (f32, 1 = token).
    pub mask: candle_core::Tensor,
    pub opts: DecodeOptions,
}

impl Prepared {
    /// The case's generation: its model, prefix, options, prompt `[B, S]` and padding
    /// mask `[B, S]`.
    pub fn generation(&self) -> Generation<'_> {
        Generation {
            model: self.model.as_ref(),
            prefix: Some(&self.prefix),
            opts: &self.opts,
            ids: &self.ids,
            pad: Some(&self.mask),
        }
    }
}

/// Build everything `case` runs on (see [`Prepared`]).
pub fn prepare(case: &Case) -> Result<Prepared, EngineError> {
    prepare_with(case, true)
}

/// [`prepare`]; with `check_adapter: false` a PEFT adapter is taken with the geometry
/// its file states, unchecked against the model: what the Python stack is handed,
/// so that it fails (or not) in its own way.
pub fn prepare_with(case: &Case, check_adapter: bool) -> Result<Prepared, EngineError> {
    let dev = Device::Cpu;
    let (model, base, checkpoint_tokenizer) = match case.scenario.model.source(&case.dir) {
        None => {
            let cfg = case.model_config().map_err(EngineError::Config)?;
            let (m, b) =
                crate::engine::train::BaseWeights::seeded(&cfg, case.scenario.model.seed, &dev)?;
            (m, b, None)
        }
        Some(src) => {
            let files = src?.resolve(&crate::io::hub::HubOptions::from_env()?)?;
            let (_, m, b, tok) = crate::io::hub::load_files_recorded(&files, &dev)?;
            (m, b, tok)
        }
    };
    let mut prefix = match case.adapter_dir() {
        Some(dir) if check_adapter => {
            crate::io::adapter::load_for(&dir, &model.geometry(), &dev)?.1
        }
        Some(dir) => crate::io::adapter::load(&dir, &dev)?.prefix_encoder_unchecked()?,
        None => PrefixEncoder::new(&case.prefix_config(), &model.geometry(), &dev)?,
    };
    prefix.config.cross = case.scenario.prefix.cross;
    // A checkpoint's own tokenizer.json unless the scenario names one.
    let tokenizer = match (checkpoint_tokenizer, &case.scenario.tokenizer) {
        (Some(t), None) => t,
        _ => case.tokenizer()?,
    };
    let prompts = case
        .prompts()
        .map_err(|e| EngineError::Config(format!("data: {e}")))?;
    let rows = prompts
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<Result<Vec<_>, _>>()?;
    let d = &case.scenario.data;
    let (ids, mask) = crate::io::data::batch_ids(&rows, d.batch_size, d.max_prompt_len, 0, &dev)?;
    let prompt_len = ids
        .dim(1)
        .map_err(|e| crate::engine::diagnosis::from_candle(e, None, "prompt"))?;
    let g = &case.scenario.generate;
    let cache = case.cache_config(prompt_len, prefix.geometry.num_virtual_tokens);
    let mut opts = DecodeOptions::for_request(cache, g.request());
    opts.layout = case.scenario.prefix.layout;
    opts.extend_mask = case.scenario.prefix.extend_mask;
    opts.expand_prefix = g.expand_prefix;
    opts.prefill_chunk = g.prefill_chunk;
    opts.mask_buffer_one_row = g.mask_buffer_one_row;
    opts.save_at = case.scenario.cache.save_at;
    Ok(Prepared {
        model,
        base,
        prefix,
        ids,
        mask,
        opts,
    })
}

/// Build and run the case: model, prefix (fresh or a PEFT adapter), optional
/// training, then generation. Fills losses, tokens, logits and the trace.
fn execute(case: &Case, r: &mut CaseResult) -> Result<(), EngineError> {
    let p = prepare(case)?;
    if let Some(train) = &case.scenario.train {
        let report =
            crate::engine::train::train_checked(p.model.as_ref(), &p.base, &p.prefix, train)?;
        r.losses = report.losses;
    }
    let prompt_len = p
        .ids
        .dim(1)
        .map_err(|e| crate::engine::diagnosis::from_candle(e, None, "prompt"))?;
    // The windows that may evict prefix positions: the cache's (layer 0 stands for
    // every layer), or each sliding layer's in a `hybrid` cache.
    let windows = match p.opts.cache.mode {
        CacheMode::Sliding { window } | CacheMode::Rotating { window } => vec![Some(window)],
        CacheMode::Hybrid { .. } => p.model.layer_windows(),
        _ => vec![],
    };
    let (virtual_tokens, new) = (
        p.prefix.geometry.num_virtual_tokens,
        p.opts.request.max_new_tokens,
    );
    r.warnings
        .extend(crate::engine::cache::hybrid::prefix_evictions(
            &windows,
            virtual_tokens,
            prompt_len,
            new,
        ));
    let gen = p.generation();
    let g = &case.scenario.generate;
    let (out, trace) = match g.merge_rows_at {
        Some(at) => crate::engine::batching::generate_merged(
            p.model.as_ref(),
            Some(&p.prefix),
            &p.opts,
            &p.ids,
            &p.mask,
            at,
            g.merge_fill_from_first_row,
        ),
        None => gen.generate_traced(),
    };
    r.trace_digest = Some(trace.digest());
    r.trace = Some(trace);
    let out = out?;
    // Settings that must not change the tokens: against the run without them.
    use crate::engine::divergence as div;
    let outcome = div::check_reference(&gen, &out)
        .and_then(|_| match g.merge_rows_at {
            // Continuous batching: every row against itself alone.
            Some(_) => div::check_rows_alone(&gen, &out, true, if g.merge_fill_from_first_row {
                "the merge sliced every row's cache to the first row's fill level: rows with more positions lost their oldest ones (the prefix first), rows with fewer attend to empty slots; slice each row by its own fill level and mask its padding"
            } else {
                "merging per-row caches must keep each row's positions and mask its padding slots: compare the merged cache with the rows' own"
            }),
            None => Ok(()),
        })
        .and_then(|_| match case.scenario.checks.padding {
            Some(crate::harness::scenario::PaddingCheck::Invariant) => div::check_padding(&gen, &out),
            None => Ok(()),
        });
    // A quantized cache against the same case unquantized: measured, not judged
    // (`checks.quantization` bounds it).
    let quant = div::quantization_report(&gen, &out);
    r.quantization = quant.as_ref().ok().cloned().flatten();
    r.tokens = out.tokens;
    r.logits = out
        .logits
        .iter()
        .map(LogitsSummary::of)
        .collect::<candle_core::Result<_>>()
        .map_err(|e| crate::engine::diagnosis::from_candle(e, None, "summarise logits"))?;
    // The summaries' sum covers every logit: NaN or infinity anywhere shows there.
    if let Some(step) = r.logits.iter().position(|l| !l.sum.is_finite()) {
        return Err(Diagnosis::new(
            DiagnosisClass::NonFinite,
            format!("the logits of step {step} contain NaN or infinity"),
        )
        .hint("non-finite weights, prefix values or an overflow in attention")
        .into());
    }
    outcome.and(quant.map(|_| ()))
}

/// Checks beyond the expectation (`checks:`): `None` when they hold, else why not.
fn extra_checks(case: &Case, r: &CaseResult) -> Option<String> {
    let checks = &case.scenario.checks;
    if let Some(crate::harness::scenario::LossCheck::Decreases) = checks.loss {
        if let (Some(first), Some(last)) = (r.losses.first(), r.losses.last()) {
            if last >= first {
                return Some(format!(
                    "checks.loss: decreases, but the loss went from {first} to {last}"
                ));
            }
        }
    }
    if let Some(q) = &checks.quantization {
        return quantization_check(q, r.quantization.as_ref());
    }
    None
}

/// `checks.quantization` against the measured report: `None` when it holds.
fn quantization_check(
    q: &crate::harness::scenario::QuantizationCheck,
    report: Option<&crate::engine::divergence::QuantReport>,
) -> Option<String> {
    let Some(rep) = report else {
        return Some(
            "checks.quantization: nothing was measured (the case has no quantized cache)".into(),
        );
    };
    if let Some(min) = q.min_token_agreement {
        if rep.token_agreement < min {
            let first = rep
                .first_token_difference
                .map(|d| format!("; first difference at step {} row {}", d.step, d.row))
                .unwrap_or_default();
            return Some(format!(
                "checks.quantization.min_token_agreement: {min}, but the tokens agree with {} on {:.4} ({} of {} tokens{first})",
                rep.reference, rep.token_agreement, rep.tokens_equal, rep.tokens_compared
            ));
        }
    }
    if let Some(max) = q.max_logit_drift {
        let drift = f64::from(rep.max_logit_drift_same_inputs);
        // NaN drift fails the bound too.
        if drift.is_nan() || drift > max {
            let steps = match rep.first_token_difference {
                Some(d) => format!("steps 0 to {}, until the first token difference", d.step),
                None => "every step (no token differs)".into(),
            };
            return Some(format!(
                "checks.quantization.max_logit_drift: {max}, but the logits drift from {} by up to {:.4e} over {steps}",
                rep.reference, rep.max_logit_drift_same_inputs
            ));
        }
    }
    None
}

/// Compare what happened with what the scenario expects.
fn judge(case: &Case, outcome: Result<(), EngineError>, r: &mut CaseResult) {
    match (case.expect(), outcome) {
        (Expect::Pass, Ok(())) => r.status = Status::Pass,
        (Expect::Pass, Err(EngineError::Shape(d))) => {
            r.status = Status::Fail;
            r.message = Some(d.to_string());
            r.diagnosis = Some(*d);
        }
        (Expect::Error(want), Ok(())) if r.warnings.iter().any(|w| w.class == want.error) => {
            r.status = Status::Pass;
            r.diagnosis = r.warnings.iter().find(|w| w.class == want.error).cloned();
        }
        (Expect::Error(want), Ok(())) => {
            r.status = Status::Fail;
            r.message = Some(format!(
                "expected a `{}` failure but the case passed (fixed? update the scenario's `expect`)",
                want.error.as_str()
            ));
        }
        (Expect::Error(want), Err(EngineError::Shape(d))) => {
            let matches = d.class == want.error
                && want.layer.is_none_or(|l| d.layer == Some(l))
                && want.attention.is_none_or(|a| d.attention == Some(a))
                && want.tensor.is_none_or(|t| d.tensor == Some(t));
            if matches {
                r.status = Status::Pass;
            } else {
                r.status = Status::Fail;
                r.message = Some(format!(
                    "expected {} but got: {d}",
                    case.expect().describe()
                ));
            }
            r.diagnosis = Some(*d);
        }
        (_, Err(e)) => {
            r.status = Status::Error;
            r.message = Some(e.to_string());
        }
    }
}

/// How a set of cases is run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Cases run at the same time (each on its own thread).
    pub jobs: usize,
    /// Per-case wall-time limit.
    pub timeout: Option<Duration>,
    /// Per-case memory budget in bytes (estimated before allocation).
    pub max_memory: u64,
    /// Stop starting new cases after the first one that did not pass.
    pub fail_fast: bool,
}

/// Run `cases` with `opts`; `on_done` is called as each case finishes (from worker
/// threads). Results come back in the order of `cases`; cases never started because
/// of `fail_fast` are absent.
pub fn run_all(
    cases: &[Case],
    opts: &RunOptions,
    on_done: &(dyn Fn(&CaseResult) + Sync),
) -> Vec<CaseResult> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: std::sync::Mutex<Vec<Option<CaseResult>>> =
        std::sync::Mutex::new(vec![None; cases.len()]);
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1) {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let r = run_isolated_with(case, opts.timeout, opts.max_memory);
                if opts.fail_fast && matches!(r.status, Status::Fail | Status::Error) {
                    stop.store(true, Ordering::SeqCst);
                }
                on_done(&r);
                results.lock().expect("results lock")[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .expect("results lock")
        .into_iter()
        .flatten()
        .collect()
}

/// Run one case on its own thread: a panic becomes an `error` result, and a case over
/// the time limit is reported as `error` while the run goes on.
pub fn run_isolated(case: &Case, timeout: Option<Duration>) -> CaseResult {
    run_isolated_with(case, timeout, DEFAULT_MAX_MEMORY)
}

/// [`run_isolated`] with a memory budget in bytes.
pub fn run_isolated_with(case: &Case, timeout: Option<Duration>, max_memory: u64) -> CaseResult {
    isolate(case, timeout, move |c| run_case_limited(c, max_memory))
}

/// Run `work` on `case` on its own thread: a panic becomes an `error` result with the
/// panic's message, a run over `timeout` an `error` result while the caller goes on;
/// both with the time spent.
pub fn isolate(
    case: &Case,
    timeout: Option<Duration>,
    work: impl FnOnce(&Case) -> CaseResult + Send + 'static,
) -> CaseResult {
    let (tx, rx) = mpsc::channel();
    let owned = case.clone();
    let start = Instant::now();
    let spawned = std::thread::Builder::new()
        .name(format!("case {}", case.id))
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&owned)));
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        let mut r = CaseResult::new(case, Status::Error);
        r.message = Some(format!("could not start a thread for the case: {e}"));
        return r;
    }
    let got = match timeout {
        Some(t) => rx.recv_timeout(t).map_err(|_| ()),
        None => rx.recv().map_err(|_| ()),
    };
    match got {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let mut r = CaseResult::new(case, Status::Error);
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            r.message = Some(format!("the case panicked: {text}"));
            r
        }
        Err(()) => {
            let mut r = CaseResult::new(case, Status::Error);
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            r.message = Some(format!(
                "time limit: the case did not finish within {:.1} s (--timeout)",
                timeout.map(|t| t.as_secs_f64()).unwrap_or_default()
            ));
            r
        }
    }
}

/// Deterministic shard `index` (1-based) of `count`: every `count`-th case.
pub fn shard<T: Clone>(items: &[T], index: usize, count: usize) -> Vec<T> {
    items
        .iter()
        .enumerate()
        .filter(|(i, _)| i % count == index - 1)
        .map(|(_, c)| c.clone())
        .collect()
}
