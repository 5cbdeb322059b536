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

use crate::engine::cache::{CacheMode, ModelCache};
use crate::engine::diagnosis::{CandleExt, EngineError, Result};
use crate::engine::model::{Encoded, Forward, Model};
use crate::engine::prefix::{extend_mask, PrefixEncoder};
use crate::engine::rng::Rng;
use crate::engine::trace::Trace;

mod choose;
mod options;
mod prefill;
pub use choose::{log_softmax, Sampler};
use choose::{BeamSettings, Beams};
pub use options::{DecodeOptions, Request, Strategy};
pub use prefill::{forward_logits, prepare_cache};

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

/// One generation's inputs: the model, its prefix, the options and the prompt.
/// [`Generation::generate`] runs it; the divergence checks run it again with other
/// options.
#[derive(Clone, Copy)]
pub struct Generation<'a> {
    pub model: &'a dyn Model,
    pub prefix: Option<&'a PrefixEncoder>,
    pub opts: &'a DecodeOptions,
    /// Prompt ids `[B, S]` (u32), left-padded. For encoder-decoders they feed the
    /// encoder and the decoder starts from its start token.
    pub ids: &'a Tensor,
    /// Padding mask `[B, S]` (1 = token; `None`: all ones).
    pub pad: Option<&'a Tensor>,
}

impl Generation<'_> {
    /// Generation with `opts.request.strategy`: `B * R` rows.
    pub fn generate(&self) -> Result<DecodeOutput> {
        self.generate_traced().0
    }

    /// Input row `i` generated alone from position `start` on (without its left
    /// padding): the prompt `ids[i, start..]` `[1, S - start]`, no padding mask.
    pub fn row_alone(&self, i: usize, start: usize) -> Result<DecodeOutput> {
        let s = self.ids.dim(1).ctx("input ids [B, S]")?;
        // [1, S - start]
        let ids = self
            .ids
            .narrow(0, i, 1)
            .and_then(|t| t.narrow(1, start, s - start))
            .ctx("row alone")?;
        let pad = None;
        Generation {
            ids: &ids,
            pad,
            ..*self
        }
        .generate()
    }

    /// [`Generation::generate`], also returning the trace recorded up to the end or to
    /// the failure.
    pub fn generate_traced(&self) -> (Result<DecodeOutput>, Trace) {
        let opts = self.opts;
        if let Err(e) = opts.validate() {
            return (Err(e), Trace::default());
        }
        let b = match self.ids.dims2().ctx("input ids [B, S]") {
            Ok((b, _)) => b,
            Err(e) => return (Err(e), Trace::default()),
        };
        // The prefix is expanded to B x R rows before it enters the cache.
        let rows = if opts.expand_prefix {
            b * opts.rows_per_input()
        } else {
            b
        };
        let prepared = prepare_cache(self.model, self.prefix, &opts.cache, opts.layout, rows);
        let mut cache = match prepared {
            Ok(c) => c,
            Err(e) => return (Err(e), Trace::default()),
        };
        match decode(self, &mut cache) {
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
}

/// Greedy generation of `opts.request.max_new_tokens` tokens after `input_ids: [B, S]` (u32),
/// with an optional padding mask `pad: [B, S]` (1 = token; defaults to all ones): the
/// [`Generation`] with `opts.request.strategy` set to greedy. EOS is honoured.
pub fn greedy(
    model: &dyn Model,
    prefix: Option<&PrefixEncoder>,
    opts: &DecodeOptions,
    input_ids: &Tensor,
    pad: Option<&Tensor>,
) -> Result<DecodeOutput> {
    let opts = opts.clone().with_strategy(Strategy::Greedy);
    Generation {
        model,
        prefix,
        opts: &opts,
        ids: input_ids,
        pad,
    }
    .generate()
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

/// Prefill and decoding steps of `g` on a prepared cache of `B * R` rows.
fn decode(g: &Generation, cache: &mut ModelCache) -> Result<Decoded> {
    let Generation {
        model,
        prefix,
        opts,
        ids: input_ids, // [B, S] u32
        pad,            // [B, S], 1 = token
    } = *g;
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
        let e = model.encode(input_ids, &pad, opts.ops)?; // states [B, E, d_model], mask [B, E]
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
    let mut chooser = match &opts.request.strategy {
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
            BeamSettings {
                beams: *num_beams,
                length_penalty: *length_penalty,
                early_stopping: *early_stopping,
                eos: opts.request.eos_token_id,
                pad: pad_id,
            },
        )),
    };

    let recompute = matches!(opts.cache.mode, CacheMode::None);
    let mut hist: Vec<Vec<u32>> = vec![vec![]; n]; // [N][step]
    let mut finished = vec![false; n];
    let mut logits = vec![];
    let mut next_input = seq.clone(); // [N, 1] after the prefill
    let mut pending_reorder: Option<Vec<u32>> = None;
    for step in 0..opts.request.max_new_tokens {
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
                    ops: opts.ops,
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
                let last_step = step + 1 == opts.request.max_new_tokens;
                let (t, src) = beams.step(&lp, &hist, step, last_step)?;
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
            if Some(*t) == opts.request.eos_token_id {
                finished[i] = true;
            }
        }
        next_input = Tensor::from_vec(tokens, (n, 1), &dev).ctx("next token")?; // [N, 1]
        seq = Tensor::cat(&[&seq, &next_input], 1).ctx("append token")?;
        seq_pad = Tensor::cat(&[&seq_pad, &ones(1)?], 1).ctx("append mask")?;
        pending_reorder = source;
        let all_done = match &chooser {
            Chooser::Beam(beams) => beams.all_done(),
            _ => opts.request.eos_token_id.is_some() && finished.iter().all(|f| *f),
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
        Chooser::Beam(beams) => {
            let (t, sc) = beams.finalize(opts.request.num_return_sequences);
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
