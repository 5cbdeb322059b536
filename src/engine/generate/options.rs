//! What a generation is asked for ([`Request`], its [`Strategy`], the [`DecodeOptions`] around it) and the
//! options no generation can run with ([`DecodeOptions::validate`]).

use serde::{Deserialize, Serialize};

use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::diagnosis::{EngineError, Result};
use crate::engine::model::Ops;
use crate::engine::prefix::PrefixLayout;

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

/// What a generation asks for: how many tokens, chosen how, when a row ends and how
/// many output rows each input row gives. A scenario's `generate:` block holds the same
/// keys ([`crate::harness::scenario::GenerateSpec::request`]); the real-stack job
/// writes it as is (the field order is the job file's key order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    pub max_new_tokens: usize,
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
}

impl Request {
    /// `max_new_tokens` greedy tokens, one output row per input row, no EOS.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            strategy: Strategy::Greedy,
            eos_token_id: None,
            pad_token_id: None,
            num_return_sequences: 1,
        }
    }
}

/// How one generation runs.
///
/// Beam search, as transformers' `generate(num_beams=..)` decides it (checked against
/// transformers 5.24 in `tests/it/reference_math.rs`):
/// - scores are cumulative log-probabilities (log-softmax of each step's logits, in
///   f64 on the host); at the first step only beam 0 is expanded (all beams are the
///   same prompt), afterwards the best `2 * num_beams` (beam, token) candidates of an
///   input row are visited in order;
/// - a candidate among the first `num_beams` becomes a finished hypothesis when it ends
///   in `eos_token_id`, or, at the last step (`max_new_tokens`), whatever its token;
///   its length is the number of generated tokens including the last one, its score
///   `sum_logprobs / len ^ length_penalty`; each row keeps its best `num_beams`;
/// - a row is done when it has `num_beams` hypotheses and either `early_stopping`, or
///   the best running beam cannot beat the worst hypothesis any more
///   (`best_running / cur_len ^ length_penalty <= worst`, transformers' heuristic);
///   done rows emit `pad` tokens; generation stops when every row is done;
/// - the best `num_return_sequences` hypotheses are returned, best first, padded with
///   `pad` to a common length.
///
/// transformers before 4.50 (`BeamSearchScorer`, e.g. 4.46.3) differs at the length
/// limit: EOS hypotheses are added first, a row that is then full with
/// `early_stopping` is done, and only the other rows get their running beams as
/// hypotheses; its early-stop heuristic also differs. On the fixtures of
/// `reference_math.rs` that changes 2 of 18 outputs.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// What is generated.
    pub request: Request,
    // How the prompt and the prefix reach the cache, and the kernels that run.
    pub cache: CacheConfig,
    /// How the prefix is shaped before it enters the cache.
    pub layout: PrefixLayout,
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
    /// Which kernels every forward pass runs (default [`Ops::Kernels`]).
    pub ops: Ops,
    // Switches between a fix (the default) and a historical bug.
    /// Prepend P visible columns to the attention mask (the fix); `false` reproduces
    /// the historical "mask not extended by P" bug.
    pub extend_mask: bool,
    /// Expand the prefix to batch x beams rows (the fix); `false` reproduces the
    /// historical bug of a prefix built for the input batch only (UnifiedSKG issue 24).
    pub expand_prefix: bool,
    /// Historical (candle issue 3582): the padding mask lives in a buffer sized for one
    /// row and is read for every row of the batch, so rows after the first see the
    /// first row's padding. `false` is the fix.
    pub mask_buffer_one_row: bool,
}

impl DecodeOptions {
    /// Greedy decoding of `max_new_tokens` with `cache`, every other option at its
    /// default.
    pub fn new(cache: CacheConfig, max_new_tokens: usize) -> Self {
        Self::for_request(cache, Request::greedy(max_new_tokens))
    }

    /// `request` with `cache`, every other option at its default (the fixes on, the
    /// prompt in one pass, the crate's kernels).
    pub fn for_request(cache: CacheConfig, request: Request) -> Self {
        Self {
            request,
            cache,
            layout: PrefixLayout::Auto,
            prefill_chunk: None,
            save_at: None,
            cache_file: None,
            ops: Ops::Kernels,
            extend_mask: true,
            expand_prefix: true,
            mask_buffer_one_row: false,
        }
    }

    /// The same options with another strategy.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.request.strategy = strategy;
        self
    }

    /// Rows per input row R: the cache, prefix and prompt are expanded to `B * R` rows.
    pub fn rows_per_input(&self) -> usize {
        match &self.request.strategy {
            Strategy::Greedy => 1,
            Strategy::Sample { .. } => self.request.num_return_sequences,
            Strategy::Beam { num_beams, .. } => *num_beams,
        }
    }

    pub(super) fn pad_id(&self) -> u32 {
        self.request
            .pad_token_id
            .or(self.request.eos_token_id)
            .unwrap_or(0)
    }

    /// Reject options no generation can run with.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(format!("generate: {m}")));
        let n = self.request.num_return_sequences;
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
        match &self.request.strategy {
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

#[cfg(test)]
mod tests {
    use super::*;

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
