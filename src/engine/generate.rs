//! Prefill and decoding with a prefix in a cache: the path every engine test, scenario
//! and bug reproduction drives.
//!
//! Three strategies ([`Strategy`]): greedy, seeded sampling and beam search, each in
//! every cache mode, with left-padded batches, an optional EOS token and
//! `num_return_sequences`. Every strategy runs on `N = B * R` rows, where `R` is the
//! number of rows per input row (1 for greedy, `num_return_sequences` for sampling,
//! `num_beams` for beams): the prompt, its padding mask, the encoder output and the
//! prefix are all expanded to `N` rows *before* the prefix enters the cache (PEFT's
//! `get_prompt(batch_size * num_beams)`), so every row of the same input shares the
//! same prefix. Beam search reorders the cache with the chosen beams before each
//! step ([`ModelCache::reorder`], one `reorder` trace event per layer and attention).
//!
//! Sampling and beam scores are computed on the host in f64 with a portable `exp` and
//! `ln` built from IEEE basic operations only (see [`Sampler`]), so that the same
//! logits give the same tokens on every platform.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::engine::cache::{CacheConfig, CacheMode, ModelCache};
use crate::engine::diagnosis::{CandleExt, Diagnosis, DiagnosisClass, EngineError, Result};
use crate::engine::model::{Encoded, Forward, Model};
use crate::engine::prefix::{extend_mask, inject, PrefixEncoder, PrefixLayout};
use crate::engine::rng::Rng;
use crate::engine::trace::Trace;

/// How the next token is chosen. In scenario files: `strategy: greedy`,
/// `strategy: {sample: {temperature: 0.8, top_k: 20, seed: 7}}`,
/// `strategy: {beam: {num_beams: 4}}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    /// The most likely token (transformers `do_sample=False, num_beams=1`).
    #[default]
    Greedy,
    /// Seeded multinomial sampling after temperature, top-k, then top-p (the order of
    /// transformers' logits warpers). `temperature: 0` means argmax.
    Sample {
        #[serde(default = "one")]
        temperature: f64,
        #[serde(default)]
        top_k: Option<usize>,
        #[serde(default)]
        top_p: Option<f64>,
        #[serde(default)]
        seed: u64,
    },
    /// Beam search over cumulative log-probabilities (transformers' `BeamSearchScorer`,
    /// simplified: see [`DecodeOptions`]).
    Beam {
        num_beams: usize,
        /// Finished hypotheses score `sum_logprobs / len ^ length_penalty`.
        #[serde(default = "one")]
        length_penalty: f64,
        /// Stop a row as soon as it has `num_beams` finished hypotheses.
        #[serde(default)]
        early_stopping: bool,
    },
}

fn one() -> f64 {
    1.0
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Greedy => "greedy",
            Strategy::Sample { .. } => "sample",
            Strategy::Beam { .. } => "beam",
        }
    }
}

/// How one generation runs.
///
/// Beam search (what is simplified against transformers' `BeamSearchScorer`):
/// - scores are cumulative log-probabilities (log-softmax of each step's logits, in
///   f64 on the host); at the first step only beam 0 is expanded (all beams are the
///   same prompt), afterwards the best `2 * num_beams` (beam, token) candidates of an
///   input row are visited in order;
/// - a candidate ending in `eos_token_id` becomes a finished hypothesis only when it
///   ranks among the first `num_beams`; its length is the number of generated tokens
///   *including* the EOS (transformers counts without it, and divides by zero when
///   EOS is the first token), score `sum_logprobs / len ^ length_penalty`;
///   each row keeps its best `num_beams` hypotheses;
/// - a row is done when it has `num_beams` hypotheses and either `early_stopping`, or
///   the best running beam cannot beat the worst hypothesis any more
///   (`best_running / cur_len ^ length_penalty <= worst`, transformers' heuristic);
///   done rows emit `pad` tokens; generation stops when every row is done;
/// - at the end, running beams of rows not done join the hypotheses; the best
///   `num_return_sequences` are returned, best first, padded with `pad` to a common
///   length.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    pub cache: CacheConfig,
    /// How the prefix is shaped before it enters the cache.
    pub layout: PrefixLayout,
    pub max_new_tokens: usize,
    /// Prepend P visible columns to the attention mask (the fix); `false` reproduces
    /// the historical "mask not extended by P" bug.
    pub extend_mask: bool,
    /// Default: greedy.
    pub strategy: Strategy,
    /// A row that emits this token is finished: afterwards it emits `pad_token_id`
    /// (shapes stay rectangular); generation stops early when every row is finished.
    pub eos_token_id: Option<u32>,
    /// What finished rows emit; default `eos_token_id`, else 0.
    pub pad_token_id: Option<u32>,
    /// Output rows per input row (default 1): at most `num_beams` for beams; sampling
    /// repeats each input row; greedy allows only 1.
    pub num_return_sequences: usize,
    /// Expand the prefix to batch x beams rows (the fix); `false` reproduces the
    /// historical bug of a prefix built for the input batch only (UnifiedSKG issue 24).
    pub expand_prefix: bool,
    /// Feed the prompt in chunks of this many tokens after the prefix (`None`: the
    /// whole prompt in one pass). Each chunk is a forward pass with its own mask
    /// `[N, 1, chunk, K]` and positions, recorded as a trace step.
    pub prefill_chunk: Option<usize>,
    /// After the forward pass of this step (0: the prefill), write the cache to
    /// `cache_file`, read it back into a fresh cache and go on with that one.
    pub save_at: Option<usize>,
    /// Where `save_at` writes the cache (`None`: a temporary file, removed after it
    /// is read back).
    pub cache_file: Option<std::path::PathBuf>,
    /// Historical (candle issue 3582): the padding mask lives in a buffer sized for one
    /// row and is read for every row of the batch, so rows after the first see the
    /// first row's padding. `false` is the fix.
    pub mask_buffer_one_row: bool,
}

impl DecodeOptions {
    pub fn new(cache: CacheConfig, max_new_tokens: usize) -> Self {
        Self {
            cache,
            layout: PrefixLayout::Auto,
            max_new_tokens,
            extend_mask: true,
            strategy: Strategy::Greedy,
            eos_token_id: None,
            pad_token_id: None,
            num_return_sequences: 1,
            expand_prefix: true,
            prefill_chunk: None,
            save_at: None,
            cache_file: None,
            mask_buffer_one_row: false,
        }
    }

    /// The same options with another strategy.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Rows per input row R: the cache, prefix and prompt are expanded to `B * R` rows.
    pub fn rows_per_input(&self) -> usize {
        match &self.strategy {
            Strategy::Greedy => 1,
            Strategy::Sample { .. } => self.num_return_sequences,
            Strategy::Beam { num_beams, .. } => *num_beams,
        }
    }

    fn pad_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_id).unwrap_or(0)
    }

    /// Reject options no generation can run with.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(format!("generate: {m}")));
        let n = self.num_return_sequences;
        if self.prefill_chunk == Some(0) {
            return bad("prefill_chunk must be at least 1".into());
        }
        if self.prefill_chunk.is_some() && self.cache.mode == CacheMode::None {
            return bad(
                "prefill_chunk needs a cache that keeps keys (`cache: none` recomputes the whole sequence every step)".into(),
            );
        }
        if n == 0 {
            return bad("num_return_sequences must be at least 1".into());
        }
        match &self.strategy {
            Strategy::Greedy if n != 1 => bad(format!(
                "greedy decoding returns one sequence per input row, num_return_sequences is {n} (use sample or beam)"
            )),
            Strategy::Greedy => Ok(()),
            Strategy::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                if !temperature.is_finite() || *temperature < 0.0 {
                    return bad(format!(
                        "temperature must be finite and >= 0, got {temperature}"
                    ));
                }
                if *top_k == Some(0) {
                    return bad("top_k must be at least 1".into());
                }
                if let Some(p) = top_p {
                    if !(*p > 0.0 && *p <= 1.0) {
                        return bad(format!("top_p must be in (0, 1], got {p}"));
                    }
                }
                Ok(())
            }
            Strategy::Beam {
                num_beams,
                length_penalty,
                ..
            } => {
                if *num_beams == 0 {
                    return bad("num_beams must be at least 1".into());
                }
                if n > *num_beams {
                    return bad(format!(
                        "num_return_sequences ({n}) must not exceed num_beams ({num_beams})"
                    ));
                }
                if !length_penalty.is_finite() {
                    return bad(format!("length_penalty must be finite, got {length_penalty}"));
                }
                Ok(())
            }
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct DecodeOutput {
    /// Generated ids, `[B * num_return_sequences][n]`: the rows of input row `i` are
    /// `i * R .. (i + 1) * R` (best first for beams); `n <= max_new_tokens` (fewer when
    /// every row finished early). Finished rows are padded with the pad id.
    pub tokens: Vec<Vec<u32>>,
    /// Next-token logits of every forward pass, `[N, V]` each with `N = B * R` running
    /// rows (step 0 is the prefill; for beams, the beams before that step's choice).
    pub logits: Vec<Tensor>,
    /// Beam search: the score of every returned hypothesis (`[B * num_return_sequences]`,
    /// `sum_logprobs / len ^ length_penalty`); sampling: the sum of the log-probabilities
    /// of the sampled tokens under the unwarped distribution; greedy: None.
    pub scores: Option<Vec<f32>>,
    /// The cache after the last step; its `trace` holds every cache event.
    pub cache: ModelCache,
}

/// Build the cache of `model` for `opts` and place the prefix in it, expanded to
/// `batch` rows (callers pass `B * R`: batch x beams, or x return sequences).
pub fn prepare_cache(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    layout: PrefixLayout,
    batch: usize,
) -> Result<ModelCache> {
    let g = model.geometry();
    let mut cache = cache.clone();
    if matches!(cache.mode, crate::engine::cache::CacheMode::Hybrid { .. })
        && cache.layer_windows.is_none()
    {
        cache.layer_windows = Some(model.layer_windows());
    }
    let mut mc = ModelCache::new(
        cache,
        model.family().legacy_layout(),
        g.num_layers,
        g.encoder_decoder,
    );
    mc.set_kv_heads(g.num_kv_heads);
    if let Some(p) = prefix {
        // per layer [batch, H, P, D] (self, and cross for encoder-decoders)
        let pkv = p.past_key_values(batch)?;
        inject(&mut mc, &pkv, layout, p.geometry.num_virtual_tokens)?;
    }
    Ok(mc)
}

/// Greedy generation of `opts.max_new_tokens` tokens after `input_ids: [B, S]` (u32),
/// with an optional padding mask `pad: [B, S]` (1 = token; defaults to all ones).
/// For encoder-decoders `input_ids` feed the encoder and the decoder starts from its
/// start token. `opts.strategy` is ignored (see [`generate`]); EOS is honoured.
pub fn greedy(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> Result<DecodeOutput> {
    let opts = opts.clone().with_strategy(Strategy::Greedy);
    generate_traced(model, prefix, &opts, input_ids, pad).0
}

/// Generation with `opts.strategy` after `input_ids: [B, S]` (u32) with an optional
/// padding mask `pad: [B, S]` (left padding; 1 = token). Returns `B * R` rows.
pub fn generate(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> Result<DecodeOutput> {
    generate_traced(model, prefix, opts, input_ids, pad).0
}

/// [`generate`], also returning the trace recorded up to the end or to the failure.
pub fn generate_traced(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> (Result<DecodeOutput>, Trace) {
    if let Err(e) = opts.validate() {
        return (Err(e), Trace::default());
    }
    let b = match input_ids.dims2().ctx("input ids [B, S]") {
        Ok((b, _)) => b,
        Err(e) => return (Err(e), Trace::default()),
    };
    // The prefix is expanded to B x R rows before it enters the cache.
    let rows = if opts.expand_prefix {
        b * opts.rows_per_input()
    } else {
        b
    };
    let mut cache = match prepare_cache(model, prefix, &opts.cache, opts.layout, rows) {
        Ok(c) => c,
        Err(e) => return (Err(e), Trace::default()),
    };
    match decode(model, prefix, opts, input_ids, pad, &mut cache) {
        Ok(d) => {
            let trace = cache.trace.clone();
            (
                Ok(DecodeOutput {
                    tokens: d.tokens,
                    logits: d.logits,
                    scores: d.scores,
                    cache,
                }),
                trace,
            )
        }
        Err(e) => (Err(e), cache.trace),
    }
}

/// What [`decode`] produced.
struct Decoded {
    /// `[B * num_return_sequences][n]`
    tokens: Vec<Vec<u32>>,
    /// n x `[N, V]`
    logits: Vec<Tensor>,
    /// `[B * num_return_sequences]`
    scores: Option<Vec<f32>>,
}

/// How the next tokens of the `N` running rows are chosen.
enum Chooser {
    Greedy,
    Sample {
        sampler: Sampler,
        /// One stream per running row: row r's tokens do not depend on the other rows.
        rngs: Vec<Rng>,
        /// Sum of log-probabilities of the sampled tokens, per row.
        logprob: Vec<f64>,
    },
    Beam(Beams),
}

/// `[0, 0, .., 1, 1, ..]`: each of `b` rows repeated `r` times (`repeat_interleave`).
fn expansion(b: usize, r: usize) -> Vec<u32> {
    (0..b * r).map(|i| (i / r) as u32).collect()
}

/// Rows `idx` (`[N']`) of `t: [N, ...]` -> `[N', ...]`.
fn rows_of(t: &Tensor, idx: &[u32], what: &str) -> Result<Tensor> {
    let i = Tensor::new(idx, t.device()).ctx(what)?;
    t.index_select(&i, 0).ctx(what)
}

/// Prefill and decoding steps on a prepared cache of `B * R` rows.
fn decode(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,   // [B, S] u32
    pad: Option<&Tensor>, // [B, S], 1 = token
    cache: &mut ModelCache,
) -> Result<Decoded> {
    let (b, s) = input_ids.dims2().ctx("input ids [B, S]")?;
    let r = opts.rows_per_input();
    let n = b * r;
    let dev = input_ids.device().clone();
    let p = prefix.map(|p| p.geometry.num_virtual_tokens).unwrap_or(0);
    // [B, S]
    let pad = match pad {
        Some(m) => m.to_dtype(DType::F32).ctx("padding mask")?,
        None => Tensor::ones((b, s), DType::F32, &dev).ctx("padding mask")?,
    };
    let ones = |k: usize| Tensor::ones((n, k), DType::F32, &dev).ctx("mask"); // [N, k]
    let with_prefix = |m: &Tensor| -> Result<Tensor> {
        // Historical: one row's buffer read for every row, [N, T] <- [1, T].
        let m = if opts.mask_buffer_one_row {
            m.narrow(0, 0, 1)
                .and_then(|r| r.broadcast_as(m.dims()))
                .and_then(|r| r.contiguous())
                .ctx("mask buffer of one row")?
        } else {
            m.clone()
        };
        // [N, T] -> [N, P + T]
        if opts.extend_mask && p > 0 {
            extend_mask(&m, p)
        } else {
            Ok(m)
        }
    };
    let expand = expansion(b, r);
    let expand_rows = |t: &Tensor, what: &str| -> Result<Tensor> {
        if r == 1 {
            Ok(t.clone())
        } else {
            rows_of(t, &expand, what)
        }
    };

    // Encoder-decoders: encode the B input rows once, repeat the output per beam /
    // return sequence, decode from the start token.
    let encoded: Option<Encoded> = if model.geometry().encoder_decoder {
        let e = model.encode(input_ids, &pad)?; // states [B, E, d_model], mask [B, E]
        Some(Encoded {
            states: expand_rows(&e.states, "repeat encoder states per row")?, // [N, E, d]
            mask: expand_rows(&e.mask, "repeat encoder mask per row")?,       // [N, E]
        })
    } else {
        None
    };
    // seq [N, T] (u32), seq_pad [N, T]: everything fed so far and its padding mask.
    let (mut seq, mut seq_pad) = match &encoded {
        Some(_) => {
            let start =
                Tensor::full(model.decoder_start_token_id(), (n, 1), &dev).ctx("start token")?;
            (start, ones(1)?)
        }
        None => (
            expand_rows(&input_ids.to_dtype(DType::U32).ctx("ids")?, "repeat prompt")?,
            expand_rows(&pad, "repeat padding mask")?,
        ),
    };

    let pad_id = opts.pad_id();
    let mut chooser = match &opts.strategy {
        Strategy::Greedy => Chooser::Greedy,
        Strategy::Sample {
            temperature,
            top_k,
            top_p,
            seed,
        } => Chooser::Sample {
            sampler: Sampler::new(*temperature, *top_k, *top_p),
            rngs: (0..n)
                .map(|row| Rng::for_name(*seed, &format!("generate/sample/row{row}")))
                .collect(),
            logprob: vec![0.0; n],
        },
        Strategy::Beam {
            num_beams,
            length_penalty,
            early_stopping,
        } => Chooser::Beam(Beams::new(
            b,
            *num_beams,
            *length_penalty,
            *early_stopping,
            opts.eos_token_id,
            pad_id,
        )),
    };

    let recompute = matches!(opts.cache.mode, CacheMode::None);
    let mut hist: Vec<Vec<u32>> = vec![vec![]; n]; // [N][step]
    let mut finished = vec![false; n];
    let mut logits = vec![];
    let mut next_input = seq.clone(); // [N, 1] after the prefill
    let mut pending_reorder: Option<Vec<u32>> = None;
    for step in 0..opts.max_new_tokens {
        cache.next_step();
        if let Some(src) = pending_reorder.take() {
            // The cache follows the beams chosen at the previous step.
            cache.reorder(&src)?;
        }
        let ids = if recompute || step == 0 {
            &seq
        } else {
            &next_input
        };
        // The prefill in chunks: [N, c] ids each over the mask [N, P + end of chunk].
        let t = ids.dim(1).ctx("ids")?;
        let chunk = match opts.prefill_chunk {
            Some(c) if step == 0 && !recompute => c.min(t),
            _ => t,
        };
        let mut out = None;
        for start in (0..t).step_by(chunk.max(1)) {
            if start > 0 {
                cache.next_step();
            }
            let len = chunk.min(t - start);
            let (ids, pad) = if len == t {
                (ids.clone(), seq_pad.clone())
            } else {
                let fed = seq_pad.dim(1).ctx("mask")? - t + start + len;
                (
                    ids.narrow(1, start, len).ctx("prompt chunk")?,
                    seq_pad.narrow(1, 0, fed).ctx("chunk mask")?,
                )
            };
            let mask = with_prefix(&pad)?; // [N, P + T so far]
                                           // [N, len or 1, V]
            out = Some(model.forward(
                &ids,
                &mut Forward {
                    cache,
                    mask: &mask,
                    encoder: encoded.as_ref(),
                    last_only: true,
                },
            )?);
        }
        let out = out.ok_or_else(|| EngineError::Config("generate: an empty prompt".into()))?;
        // [N, V]
        let last = out
            .narrow(1, out.dim(1).ctx("logits")? - 1, 1)
            .and_then(|l| l.squeeze(1))
            .ctx("last logits")?;
        let (mut tokens, source): (Vec<u32>, Option<Vec<u32>>) = match &mut chooser {
            Chooser::Greedy => (
                last.argmax(D::Minus1)
                    .and_then(|t| t.to_vec1::<u32>())
                    .ctx("argmax")?,
                None,
            ),
            Chooser::Sample {
                sampler,
                rngs,
                logprob,
            } => {
                let rows = host_rows(&last)?;
                let mut toks = Vec::with_capacity(n);
                for (i, (row, rng)) in rows.iter().zip(rngs.iter_mut()).enumerate() {
                    let t = sampler.sample(row, rng)?;
                    if !finished[i] {
                        let lp = log_softmax(row)?;
                        logprob[i] += lp.get(t as usize).copied().unwrap_or(f64::NEG_INFINITY);
                    }
                    toks.push(t);
                }
                (toks, None)
            }
            Chooser::Beam(beams) => {
                let rows = host_rows(&last)?;
                let lp = rows
                    .iter()
                    .map(|r| log_softmax(r))
                    .collect::<Result<Vec<_>>>()?;
                let (t, src) = beams.step(&lp, &hist, step)?;
                (t, Some(src))
            }
        };
        logits.push(last);
        if let Some(src) = &source {
            // Beams: histories, fed ids and masks follow the chosen beams.
            hist = src
                .iter()
                .map(|i| {
                    hist.get(*i as usize).cloned().ok_or_else(|| {
                        EngineError::Config(format!("beam search chose a missing row {i}"))
                    })
                })
                .collect::<Result<_>>()?;
            seq = rows_of(&seq, src, "reorder ids")?;
            seq_pad = rows_of(&seq_pad, src, "reorder mask")?;
        } else {
            // Greedy / sampling: finished rows emit the pad id.
            for (t, f) in tokens.iter_mut().zip(&finished) {
                if *f {
                    *t = pad_id;
                }
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            hist[i].push(*t);
            if Some(*t) == opts.eos_token_id {
                finished[i] = true;
            }
        }
        next_input = Tensor::from_vec(tokens, (n, 1), &dev).ctx("next token")?; // [N, 1]
        seq = Tensor::cat(&[&seq, &next_input], 1).ctx("append token")?;
        seq_pad = Tensor::cat(&[&seq_pad, &ones(1)?], 1).ctx("append mask")?;
        pending_reorder = source;
        let all_done = match &chooser {
            Chooser::Beam(beams) => beams.all_done(),
            _ => opts.eos_token_id.is_some() && finished.iter().all(|f| *f),
        };
        if all_done {
            break;
        }
        if opts.save_at == Some(step) {
            *cache = save_and_reload(cache, opts.cache_file.as_deref())?;
        }
    }
    let (tokens, scores) = match chooser {
        Chooser::Greedy => (hist, None),
        Chooser::Sample { logprob, .. } => {
            (hist, Some(logprob.iter().map(|x| *x as f32).collect()))
        }
        Chooser::Beam(mut beams) => {
            let (t, sc) = beams.finalize(&hist, opts.num_return_sequences);
            (t, Some(sc))
        }
    };
    Ok(Decoded {
        tokens,
        logits,
        scores,
    })
}

/// Write `cache` to `file` (else a temporary file, removed afterwards) and read it back
/// into a fresh cache of the same mode, which carries the trace on.
fn save_and_reload(cache: &mut ModelCache, file: Option<&std::path::Path>) -> Result<ModelCache> {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let temp = file.is_none();
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => std::env::temp_dir().join(format!(
            "prefix-harness-{}-{}.cache.safetensors",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )),
    };
    let result = cache.save(&path).and_then(|_| {
        // The fresh cache carries the trace on, the save events included.
        let mut fresh = cache.emptied();
        fresh.restore(&path).map(|_| fresh)
    });
    if temp {
        let _ = std::fs::remove_file(&path);
    }
    result
}

/// `[N, V]` logits to host rows (f32).
fn host_rows(last: &Tensor) -> Result<Vec<Vec<f32>>> {
    last.to_dtype(DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .ctx("logits to host")
}

fn non_finite(what: &str) -> EngineError {
    Diagnosis::new(
        DiagnosisClass::NonFinite,
        format!("the next-token logits contain NaN or +inf ({what})"),
    )
    .hint(
        "NaN or infinity in weights, prefix or activations (check the prefix values and the mask)",
    )
    .into()
}

/// Log-softmax of one row of logits, in f64 with the portable `exp`/`ln`; the sum runs
/// in index order, so the result is the same on every platform for the same logits.
pub fn log_softmax(row: &[f32]) -> Result<Vec<f64>> {
    if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(non_finite("log-softmax"));
    }
    let m = row.iter().fold(f64::NEG_INFINITY, |m, x| {
        if (*x as f64) > m {
            *x as f64
        } else {
            m
        }
    });
    if m == f64::NEG_INFINITY {
        return Err(non_finite("every logit is -inf"));
    }
    let sum: f64 = row.iter().map(|x| pmath::exp(*x as f64 - m)).sum();
    let lse = pmath::ln(sum);
    Ok(row.iter().map(|x| (*x as f64 - m) - lse).collect())
}

/// A portable token sampler: temperature, then top-k, then top-p (nucleus), then one
/// multinomial draw.
///
/// Why not candle-transformers' `LogitsProcessor`: it draws from `rand`'s `StdRng`,
/// whose algorithm `rand` documents as not reproducible across its versions, through
/// `WeightedIndex` on f32 weights and `exp` from the platform maths library. This
/// sampler draws one number per token from [`Rng`] (SplitMix64, integer arithmetic),
/// computes the probabilities in f64 with an `exp` made of IEEE basic operations only
/// (no `libm`), sorts with a total order (ties by token id) and sums in a fixed
/// order: the same logits and seed give the same token on Linux, Windows and macOS.
/// (The logits themselves may still differ in their last bits between platforms; a
/// sampled token changes only if that moves a cumulative probability across the
/// drawn number.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

impl Sampler {
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Self {
        Self {
            temperature,
            top_k,
            top_p,
        }
    }

    /// One token from `logits` (`[V]`). Always consumes exactly one draw of `rng`, so a
    /// row's stream stays aligned whatever the settings.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> Result<u32> {
        let u = rng.next_unit();
        let (order, w) = self.candidates(logits)?;
        let kept: f64 = w.iter().sum();
        let target = u * kept;
        let mut cum = 0.0;
        for (i, x) in w.iter().enumerate() {
            cum += x;
            if target < cum {
                return Ok(order[i] as u32);
            }
        }
        Ok(order[w.len() - 1] as u32)
    }

    /// The probability of every token of `logits` (`[V]`) under this sampler: what
    /// [`Sampler::sample`] draws from (0 for the tokens top-k and top-p removed).
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<f64>> {
        let (order, w) = self.candidates(logits)?;
        let kept: f64 = w.iter().sum();
        let mut p = vec![0.0; logits.len()];
        for (i, x) in order.iter().zip(&w) {
            p[*i] = x / kept;
        }
        Ok(p)
    }

    /// The tokens that may be drawn, best first, with their unnormalised probabilities
    /// `exp((x - max) / T)` after temperature, top-k and top-p. Temperature 0 (argmax)
    /// and all-`-inf` logits keep only the best token, with weight 1.
    fn candidates(&self, logits: &[f32]) -> Result<(Vec<usize>, Vec<f64>)> {
        if logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(non_finite("sampling"));
        }
        if logits.is_empty() {
            return Err(EngineError::Config(
                "sampling from an empty vocabulary".into(),
            ));
        }
        // Candidates best first; ties by token id (a total, platform-independent order).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
        if self.temperature <= 0.0 {
            return Ok((vec![order[0]], vec![1.0]));
        }
        let keep = self
            .top_k
            .map(|k| k.clamp(1, order.len()))
            .unwrap_or(order.len());
        order.truncate(keep);
        let t = self.temperature;
        let m = logits[order[0]] as f64 / t;
        if m == f64::NEG_INFINITY {
            return Ok((vec![order[0]], vec![1.0]));
        }
        let mut w: Vec<f64> = order
            .iter()
            .map(|i| pmath::exp(logits[*i] as f64 / t - m))
            .collect();
        let total: f64 = w.iter().sum();
        if let Some(top_p) = self.top_p {
            if top_p < 1.0 {
                // The smallest best-first set whose probability reaches top_p.
                let mut cum = 0.0;
                for (i, x) in w.iter().enumerate() {
                    cum += x;
                    if cum >= top_p * total {
                        w.truncate(i + 1);
                        order.truncate(i + 1);
                        break;
                    }
                }
            }
        }
        Ok((order, w))
    }
}

/// A finished hypothesis.
#[derive(Debug, Clone)]
struct Hyp {
    /// `sum_logprobs / len ^ length_penalty`
    score: f64,
    tokens: Vec<u32>,
}

/// Beam search state over `B` input rows of `K` beams (running rows `b * K + j`).
#[derive(Debug, Clone)]
struct Beams {
    batch: usize,
    beams: usize,
    length_penalty: f64,
    early_stopping: bool,
    eos: Option<u32>,
    pad: u32,
    /// `[B * K]` cumulative log-probability of each running beam.
    scores: Vec<f64>,
    /// Per input row, best first, at most K.
    hyps: Vec<Vec<Hyp>>,
    /// Per input row.
    done: Vec<bool>,
}

impl Beams {
    fn new(
        batch: usize,
        beams: usize,
        length_penalty: f64,
        early_stopping: bool,
        eos: Option<u32>,
        pad: u32,
    ) -> Self {
        Self {
            batch,
            beams,
            length_penalty,
            early_stopping,
            eos,
            pad,
            scores: vec![0.0; batch * beams],
            hyps: vec![vec![]; batch],
            done: vec![false; batch],
        }
    }

    /// `len ^ length_penalty` (1 for an empty sequence).
    fn penalty(&self, len: usize) -> f64 {
        if len == 0 {
            1.0
        } else {
            pmath::pow(len as f64, self.length_penalty)
        }
    }

    fn add(&mut self, row: usize, sum_logprobs: f64, tokens: Vec<u32>) {
        let score = sum_logprobs / self.penalty(tokens.len());
        let k = self.beams;
        if let Some(h) = self.hyps.get_mut(row) {
            h.push(Hyp { score, tokens });
            // Stable: an earlier hypothesis wins a tie.
            h.sort_by(|a, b| b.score.total_cmp(&a.score));
            h.truncate(k);
        }
    }

    fn is_done(&self, row: usize, best_running: f64, cur_len: usize) -> bool {
        let h = &self.hyps[row];
        if h.len() < self.beams {
            return false;
        }
        if self.early_stopping {
            return true;
        }
        let worst = h.last().map(|x| x.score).unwrap_or(f64::NEG_INFINITY);
        worst >= best_running / self.penalty(cur_len)
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// One step: `logprobs` `[B*K][V]` of the running beams, `hist` `[B*K][step]` their
    /// tokens so far. Returns the next token of every running row and the beam it
    /// continues (`[B*K]` each, indices into the previous rows).
    fn step(
        &mut self,
        logprobs: &[Vec<f64>],
        hist: &[Vec<u32>],
        step: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let k = self.beams;
        let n = self.batch * k;
        let mut tokens = vec![self.pad; n];
        let mut source: Vec<u32> = (0..n as u32).collect();
        let mut scores = self.scores.clone();
        for row in 0..self.batch {
            if self.done[row] {
                continue; // pad tokens, beams stay in place
            }
            // At the first step every beam of a row is the same prompt: expand beam 0.
            let live = if step == 0 { 1 } else { k };
            let mut cand: Vec<(f64, usize, usize)> = vec![];
            for j in 0..live {
                let i = row * k + j;
                let lp = logprobs.get(i).ok_or_else(|| {
                    EngineError::Config(format!("beam search: no logits for row {i}"))
                })?;
                cand.extend(
                    lp.iter()
                        .enumerate()
                        .map(|(t, x)| (self.scores[i] + x, j, t)),
                );
            }
            // Best first; ties by beam, then token id.
            cand.sort_by(|a, c| c.0.total_cmp(&a.0).then(a.1.cmp(&c.1)).then(a.2.cmp(&c.2)));
            cand.truncate(2 * k);
            let mut next: Vec<(f64, usize, u32)> = Vec::with_capacity(k);
            for (rank, (score, j, t)) in cand.into_iter().enumerate() {
                let t = t as u32;
                if Some(t) == self.eos {
                    // Only an EOS among the best K candidates finishes a hypothesis.
                    if rank < k {
                        let mut toks = hist.get(row * k + j).cloned().unwrap_or_default();
                        toks.push(t);
                        self.add(row, score, toks);
                    }
                    continue;
                }
                next.push((score, j, t));
                if next.len() == k {
                    break;
                }
            }
            if next.len() < k {
                return Err(EngineError::Config(format!(
                    "beam search: {k} beams need at least {} non-EOS candidates per row; the vocabulary is too small",
                    k
                )));
            }
            for (slot, (score, j, t)) in next.iter().enumerate() {
                let i = row * k + slot;
                scores[i] = *score;
                tokens[i] = *t;
                source[i] = (row * k + j) as u32;
            }
            self.done[row] = self.is_done(row, next[0].0, step + 1);
        }
        self.scores = scores;
        Ok((tokens, source))
    }

    /// The best `num_return` hypotheses of every input row, best first:
    /// `([B * num_return][len], [B * num_return])`, padded with `pad` to one length.
    fn finalize(&mut self, hist: &[Vec<u32>], num_return: usize) -> (Vec<Vec<u32>>, Vec<f32>) {
        let k = self.beams;
        for row in 0..self.batch {
            if !self.done[row] {
                for j in 0..k {
                    let i = row * k + j;
                    let toks = hist.get(i).cloned().unwrap_or_default();
                    self.add(row, self.scores[i], toks);
                }
            }
        }
        let mut tokens = vec![];
        let mut scores = vec![];
        for h in &self.hyps {
            for hyp in h.iter().take(num_return) {
                tokens.push(hyp.tokens.clone());
                scores.push(hyp.score as f32);
            }
        }
        let len = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        for t in &mut tokens {
            t.resize(len, self.pad);
        }
        (tokens, scores)
    }
}

/// `exp`, `ln` and `pow` from IEEE-754 basic operations only (add, subtract, multiply,
/// divide, exact rounding to an integer, exponent bit manipulation): no platform
/// `libm` call, so every platform computes the same bits. Accurate to a few ulp,
/// which is what sampling and beam scores need.
mod pmath {
    use std::f64::consts::{LOG2_E, SQRT_2};
    /// ln 2 split for Cody-Waite reduction (fdlibm's constants): the high part has
    /// trailing zero bits, so `k * LN2_HI` is exact for |k| < 2^11.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

    /// 2^k for k in [-1022, 1023].
    fn two_pow(k: i64) -> f64 {
        f64::from_bits(((k + 1023) as u64) << 52)
    }

    pub fn exp(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        if x > 709.0 {
            return f64::INFINITY;
        }
        if x < -708.0 {
            // Below the normal range; next to the largest term (1) it is nothing.
            return 0.0;
        }
        // x = k ln2 + r, |r| <= ln2 / 2 (Cody-Waite reduction).
        let k = (x * LOG2_E).round();
        let r = (x - k * LN2_HI) - k * LN2_LO;
        // Taylor series to r^15 / 15! (error < 1e-17 for |r| <= 0.35), Horner form.
        let mut p = 1.0;
        for i in (1..=15).rev() {
            p = 1.0 + p * r / i as f64;
        }
        p * two_pow(k as i64)
    }

    pub fn ln(x: f64) -> f64 {
        if x.is_nan() || x < 0.0 {
            return f64::NAN;
        }
        if x == 0.0 {
            return f64::NEG_INFINITY;
        }
        if x.is_infinite() {
            return x;
        }
        if x < f64::MIN_POSITIVE {
            // Subnormal: scale into the normal range first (2^54).
            return ln(x * 18_014_398_509_481_984.0) - 54.0 * (LN2_HI + LN2_LO);
        }
        let bits = x.to_bits();
        let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
        if m > SQRT_2 {
            m /= 2.0;
            e += 1;
        }
        // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172.
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let mut p = 0.0;
        for i in (0..=12).rev() {
            p = 1.0 / (2 * i + 1) as f64 + s2 * p;
        }
        let e = e as f64;
        e * LN2_HI + (e * LN2_LO + 2.0 * s * p)
    }

    /// x^y for x > 0 (exact for y = 0 and y = 1).
    pub fn pow(x: f64, y: f64) -> f64 {
        if y == 0.0 {
            1.0
        } else if y == 1.0 {
            x
        } else {
            exp(y * ln(x))
        }
    }
}

/// Logits `[B, S, V]` of one forward pass over `input_ids: [B, S]` with the prefix in a
/// fresh cache: what a training step or a parity test compares.
pub fn forward_logits(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    cache: &CacheConfig,
    input_ids: &Tensor,
    decoder_ids: Option<&Tensor>,
) -> Result<(Tensor, ModelCache)> {
    let (b, s) = input_ids.dims2().ctx("input ids [B, S]")?;
    let dev = input_ids.device().clone();
    let p = prefix.map(|p| p.geometry.num_virtual_tokens).unwrap_or(0);
    let mut mc = prepare_cache(model, prefix, cache, PrefixLayout::Auto, b)?;
    let pad = Tensor::ones((b, s), DType::F32, &dev).ctx("mask")?;
    let (ids, encoded) = if model.geometry().encoder_decoder {
        let enc = model.encode(input_ids, &pad)?;
        let dec = decoder_ids.cloned().ok_or_else(|| {
            crate::engine::diagnosis::EngineError::Config(
                "encoder-decoder needs decoder ids".into(),
            )
        })?;
        (dec, Some(enc))
    } else {
        (input_ids.clone(), None)
    };
    let t = ids.dim(1).ctx("ids")?;
    let mask = extend_mask(&Tensor::ones((b, t), DType::F32, &dev).ctx("mask")?, p)?;
    mc.next_step();
    let out = model.forward(
        &ids,
        &mut Forward {
            cache: &mut mc,
            mask: &mask,
            encoder: encoded.as_ref(),
            last_only: false,
        },
    )?;
    Ok((out, mc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The length penalty ranks finished hypotheses by `sum_logprobs / len ^ penalty`:
    /// a penalty of 2 prefers the longer of two hypotheses, 0 the likelier one, and at
    /// most `num_beams` are kept, best first.
    #[test]
    fn beam_hypotheses_are_ranked_with_the_length_penalty() {
        let mut b = Beams::new(1, 2, 2.0, false, Some(1), 0);
        assert!((b.penalty(3) - 9.0).abs() < 1e-12);
        assert_eq!(b.penalty(0), 1.0);
        b.add(0, -3.0, vec![1]); // -3 / 1
        b.add(0, -6.0, vec![5, 6, 1]); // -6 / 9
        b.add(0, -60.0, vec![5, 6, 7, 1]); // -60 / 16: dropped (third of two)
        let tokens: Vec<usize> = b.hyps[0].iter().map(|h| h.tokens.len()).collect();
        assert_eq!(tokens, [3, 1]);
        assert!((b.hyps[0][0].score - (-6.0 / 9.0)).abs() < 1e-12);
        let mut b = Beams::new(1, 2, 0.0, false, Some(1), 0);
        b.add(0, -3.0, vec![1]);
        b.add(0, -6.0, vec![5, 6, 1]);
        assert_eq!(b.hyps[0][0].tokens, [1], "no penalty: the likelier wins");
    }

    /// A row is done when it holds `num_beams` hypotheses and either `early_stopping`,
    /// or no running beam can beat the worst of them any more.
    #[test]
    fn a_beam_row_is_done_by_early_stopping_or_when_no_running_beam_can_win() {
        let mut b = Beams::new(1, 2, 1.0, false, Some(1), 0);
        b.add(0, -2.0, vec![4, 1]); // -1.0
        assert!(!b.is_done(0, -100.0, 2), "one hypothesis of two");
        b.add(0, -4.0, vec![4, 4, 1]); // -4/3
                                       // worst = -4/3; best running -6 at length 4: -1.5 < -4/3 -> done.
        assert!(b.is_done(0, -6.0, 4));
        // best running -2 at length 4: -0.5 could still beat it -> not done.
        assert!(!b.is_done(0, -2.0, 4));
        let mut e = b.clone();
        e.early_stopping = true;
        assert!(
            e.is_done(0, -2.0, 4),
            "early stopping ends the row at num_beams hypotheses"
        );
    }

    #[test]
    fn portable_exp_and_ln_match_std_to_a_few_ulp() {
        let mut x = -700.0;
        while x < 700.0 {
            let (a, b) = (pmath::exp(x), x.exp());
            assert!(((a - b) / b).abs() < 1e-15, "exp({x}): {a} vs {b}");
            x += 0.37;
        }
        for x in [1e-300, 1e-10, 0.3, 1.0, 1.5, 2.0, 10.0, 256.0, 1e10, 1e300] {
            let (a, b) = (pmath::ln(x), x.ln());
            assert!(
                (a - b).abs() <= 1e-15 * b.abs().max(1.0),
                "ln({x}): {a} vs {b}"
            );
        }
        assert_eq!(pmath::exp(0.0), 1.0);
        assert_eq!(pmath::ln(1.0), 0.0);
        assert!((pmath::pow(7.0, 0.5) - 7f64.sqrt()).abs() < 1e-14);
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, f32::NEG_INFINITY]).unwrap();
        let s: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert!(log_softmax(&[1.0, f32::NAN]).is_err());
    }

    #[test]
    fn sampler_respects_top_k_top_p_and_temperature_zero() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.8];
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            assert_eq!(
                Sampler::new(0.0, None, None)
                    .sample(&logits, &mut rng)
                    .unwrap(),
                1
            );
            assert_eq!(
                Sampler::new(1.0, Some(1), None)
                    .sample(&logits, &mut rng)
                    .unwrap(),
                1
            );
            let t = Sampler::new(1.0, Some(3), None)
                .sample(&logits, &mut rng)
                .unwrap();
            assert!([1, 2, 4].contains(&t));
            let t = Sampler::new(1.0, None, Some(0.01))
                .sample(&logits, &mut rng)
                .unwrap();
            assert_eq!(t, 1);
        }
        // Roughly the softmax frequencies.
        let mut counts = [0usize; 5];
        let mut rng = Rng::new(9);
        for _ in 0..20_000 {
            counts[Sampler::new(1.0, None, None)
                .sample(&logits, &mut rng)
                .unwrap() as usize] += 1;
        }
        let lp = log_softmax(&logits).unwrap();
        for (c, l) in counts.iter().zip(&lp) {
            let f = *c as f64 / 20_000.0;
            assert!((f - l.exp()).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn strategy_parses_from_yaml_like_json() {
        let s: Strategy = serde_json::from_str("\"greedy\"").unwrap();
        assert_eq!(s, Strategy::Greedy);
        let s: Strategy = serde_json::from_str(r#"{"beam": {"num_beams": 4}}"#).unwrap();
        assert_eq!(
            s,
            Strategy::Beam {
                num_beams: 4,
                length_penalty: 1.0,
                early_stopping: false
            }
        );
        let s: Strategy =
            serde_json::from_str(r#"{"sample": {"temperature": 0.7, "top_k": 5, "seed": 3}}"#)
                .unwrap();
        assert_eq!(
            s,
            Strategy::Sample {
                temperature: 0.7,
                top_k: Some(5),
                top_p: None,
                seed: 3
            }
        );
        assert!(serde_json::from_str::<Strategy>(r#"{"beam": {"beams": 4}}"#).is_err());
    }
}
