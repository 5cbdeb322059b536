//! Model families. One file per family, each with a config that deserializes the
//! Hugging Face `config.json` of that architecture, a tiny config for tests, and a
//! forward pass that reads and writes keys/values only through [`ModelCache`].
//!
//! Where shapes are decided: each family's `Config::geometry` gives the cache geometry
//! (layers, KV heads, head_dim); attention computes `[B, KVH, S, D]` keys and values
//! and hands them to the cache.

pub mod attention;
pub mod bloom;
pub mod facts;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod gpt_bigcode;
pub mod gpt_neox;
pub mod kernels;
pub mod llama;
pub mod mistral;
pub mod mlp;
pub mod nn;
pub mod phi3;
pub mod projections;
pub mod qwen2;
pub mod qwen3;
pub mod t5;
pub mod weights;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::engine::cache::{Layout, ModelCache};
use crate::engine::diagnosis::{EngineError, Result};

pub use facts::{Facts, ModelGeometry};
pub use nn::Ops;

/// A model family: each has its own cache geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gpt2,
    Llama,
    Bloom,
    GptBigcode,
    T5,
    Qwen2,
    Mistral,
    Qwen3,
    Phi3,
    GptNeox,
    Gemma2,
    Gemma3,
}

impl Family {
    pub const ALL: [Family; 12] = [
        Family::Gpt2,
        Family::Llama,
        Family::Bloom,
        Family::GptBigcode,
        Family::T5,
        Family::Qwen2,
        Family::Mistral,
        Family::Qwen3,
        Family::Phi3,
        Family::GptNeox,
        Family::Gemma2,
        Family::Gemma3,
    ];

    /// The `config.json` field that holds the number of layers (what `repro --shrink`
    /// lowers).
    pub fn layers_field(&self) -> &'static str {
        match self {
            Family::Gpt2 | Family::Bloom | Family::GptBigcode => "n_layer",
            Family::Llama
            | Family::Qwen2
            | Family::Mistral
            | Family::Qwen3
            | Family::Phi3
            | Family::GptNeox
            | Family::Gemma2
            | Family::Gemma3 => "num_hidden_layers",
            Family::T5 => "num_layers",
        }
    }

    /// The family's name in scenario files (`model.family`).
    pub fn name(&self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Bloom => "bloom",
            Family::GptBigcode => "gpt_bigcode",
            Family::T5 => "t5",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::GptNeox => "gpt_neox",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }

    /// The Hugging Face `model_type` (`config.json`): the name, except for Gemma 3's
    /// text model (`gemma3` is the multimodal model's).
    pub fn model_type(&self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3_text",
            f => f.name(),
        }
    }

    /// transformers' defaults for the fields of this family's `config.json` that the
    /// config reads: a field absent from the file takes its value from here (`null`: the
    /// field's `None`). `src/engine/model/defaults/<model_type>.json`, checked against the
    /// transformers classes by `ci/stack/test_defaults.py`. `None`: the family's config
    /// has serde defaults of its own (gpt2, bloom, gpt_bigcode, t5) or requires its
    /// fields (llama).
    pub fn hf_defaults(&self) -> Option<&'static str> {
        match self {
            Family::Qwen2 => Some(include_str!("defaults/qwen2.json")),
            Family::Qwen3 => Some(include_str!("defaults/qwen3.json")),
            Family::Mistral => Some(include_str!("defaults/mistral.json")),
            Family::Phi3 => Some(include_str!("defaults/phi3.json")),
            Family::GptNeox => Some(include_str!("defaults/gpt_neox.json")),
            Family::Gemma2 => Some(include_str!("defaults/gemma2.json")),
            Family::Gemma3 => Some(include_str!("defaults/gemma3_text.json")),
            Family::Gpt2 | Family::Llama | Family::Bloom | Family::GptBigcode | Family::T5 => None,
        }
    }

    /// The transformers class a checkpoint of this family is saved from
    /// (`architectures` in `config.json`).
    pub fn architecture(&self) -> &'static str {
        match self {
            Family::Gpt2 => "GPT2LMHeadModel",
            Family::Llama => "LlamaForCausalLM",
            Family::Bloom => "BloomForCausalLM",
            Family::GptBigcode => "GPTBigCodeForCausalLM",
            Family::T5 => "T5ForConditionalGeneration",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::GptNeox => "GPTNeoXForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    pub fn from_name(name: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The layout older transformers stored this family's cache in (`cache: legacy`).
    pub fn legacy_layout(&self) -> Layout {
        match self {
            Family::Bloom => Layout::BloomLegacy,
            Family::GptBigcode => Layout::BigcodeFused,
            _ => Layout::Standard,
        }
    }
}

/// A GELU as a `config.json` names it (`hidden_act`, `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `gelu`: exact, with erf.
    Erf,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    Tanh,
}

impl Gelu {
    /// The names a config may give; a family's check refuses any other.
    pub const NAMES: [&'static str; 4] = ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

    /// The GELU that `name` (one of [`Gelu::NAMES`]) means.
    pub fn named(name: &str) -> Self {
        if name == "gelu" {
            Gelu::Erf
        } else {
            Gelu::Tanh
        }
    }

    /// `x: [..]` -> `[..]`
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Gelu::Erf => x.gelu_erf(),
            Gelu::Tanh => nn::gelu_tanh(x),
        }
    }
}

/// The output of an encoder: `states: [B, E, d_model]`, `mask: [B, E]` (1 = token).
#[derive(Debug, Clone)]
pub struct Encoded {
    pub states: Tensor,
    pub mask: Tensor,
}

/// What a forward pass reads besides the token ids.
pub struct Forward<'a> {
    pub cache: &'a mut ModelCache,
    /// Padding mask over every position written so far, this pass included, prefix
    /// columns first: `[B, past + S]` (1 = visible).
    pub mask: &'a Tensor,
    /// Encoder-decoders: the encoder output.
    pub encoder: Option<&'a Encoded>,
    /// Logits for the last position only (`[B, 1, V]`), as generation needs them
    /// (transformers' `logits_to_keep=1`): the final norm and LM head skip the others.
    pub last_only: bool,
    /// Which kernels the pass runs (ARCHITECTURE.md, "Ops modes"): [`Ops::Kernels`]
    /// except to reproduce the fused-ops bug or to test the block ops.
    pub ops: Ops,
}

impl Forward<'_> {
    /// A pass over `ids: [B, S]`: `(S, past)`, its new positions and the cached ones
    /// before them.
    pub fn span(&self, ids: &Tensor) -> Result<(usize, usize)> {
        use crate::engine::diagnosis::CandleExt;
        let (_b, s) = ids.dims2().ctx("input ids [B, S]")?;
        Ok((s, self.cache.past_len()))
    }

    /// The hidden states the final norm and LM head see:
    /// `h: [B, S, E]` -> `[B, S, E]`, or `[B, 1, E]` with [`Forward::last_only`].
    pub fn kept_positions(&self, h: &Tensor) -> Result<Tensor> {
        use crate::engine::diagnosis::CandleExt;
        if !self.last_only {
            return Ok(h.clone());
        }
        let s = h.dim(1).ctx("hidden states [B, S, E]")?;
        h.narrow(1, s.saturating_sub(1), 1.min(s))
            .ctx("last position")
    }
}

/// A model of one family, loaded with weights. A family's model writes [`Model::facts`]
/// and [`Model::forward`]; `family`, `geometry` and `layer_windows` read the facts.
pub trait Model: Send + Sync {
    /// What the model reports about itself (family, geometry, per-layer windows), fixed
    /// at load.
    fn facts(&self) -> &Facts;
    fn family(&self) -> Family {
        self.facts().family
    }
    fn geometry(&self) -> ModelGeometry {
        self.facts().geometry
    }
    /// `ids: [B, S]` (decoder ids for encoder-decoders) -> logits `[B, S, V]`.
    /// Query positions start at `fw.cache.past_len()`.
    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor>;
    /// Encoder-decoders: `ids: [B, E]`, `mask: [B, E]` -> encoder output, with the
    /// kernels of `ops` (the mode of the passes that read it).
    fn encode(&self, _ids: &Tensor, _mask: &Tensor, _ops: Ops) -> Result<Encoded> {
        Err(EngineError::Config(format!(
            "{} is not an encoder-decoder model",
            self.family().name()
        )))
    }
    /// The attention window of each layer from the model's config (`None`: global),
    /// what a `hybrid` cache builds its per-layer stores from: [`Facts::windows`].
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.facts().windows.clone()
    }
    /// The token the decoder starts from (encoder-decoders).
    fn decoder_start_token_id(&self) -> u32 {
        0
    }
}

/// A family's tiny config (`src/engine/model/tiny/<family>.json`): a complete
/// `config.json`, every field written out, so that what a scenario's `family:` runs is
/// readable as the file transformers would load.
fn tiny_config<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text)
        .expect("a tiny config file is a complete config (test: tiny_configs)")
}

/// `config: {..}` (a `config.json`) with every field it lacks taken from `defaults` (a
/// JSON object: [`Family::hf_defaults`]).
fn with_defaults(mut config: serde_json::Value, defaults: Option<&str>) -> serde_json::Value {
    let defaults: serde_json::Map<String, serde_json::Value> = defaults
        .map(|text| serde_json::from_str(text).expect("a family's defaults file is a JSON object"))
        .unwrap_or_default();
    if let serde_json::Value::Object(fields) = &mut config {
        for (key, value) in defaults {
            fields.entry(key).or_insert(value);
        }
    }
    config
}

/// The sizes every decoder-only family's `config.json` gives under the same names.
/// Each family's config holds them flattened (`#[serde(flatten)] pub sizes: Sizes`), so
/// its `config.json` reads as before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The MLP's inner width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The positions RoPE is laid out for (absent in a Llama `config.json`: 2048).
    #[serde(default = "Sizes::default_max_positions")]
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix (absent in a Llama `config.json`: false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Sizes {
    fn default_max_positions() -> usize {
        2048
    }

    /// The cache geometry of a decoder-only model with `kv_heads` KV heads of
    /// `head_dim` and RoPE positions: no position table, so nothing is out of range
    /// (past `max_position_embeddings` the positions still compute, with degraded
    /// quality).
    pub fn rope_geometry(&self, kv_heads: usize, head_dim: usize) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_kv_heads: kv_heads,
            head_dim,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_positions: None,
            encoder_decoder: false,
        }
    }
}

/// A family and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum ModelConfig {
    Gpt2(gpt2::Config),
    Llama(llama::Config),
    Bloom(bloom::Config),
    GptBigcode(gpt_bigcode::Config),
    T5(t5::Config),
    Qwen2(qwen2::Config),
    Mistral(mistral::Config),
    Qwen3(qwen3::Config),
    Phi3(phi3::Config),
    GptNeox(gpt_neox::Config),
    Gemma2(gemma2::Config),
    Gemma3(gemma3::Config),
}

impl ModelConfig {
    /// The tiny test configuration of a family (hidden 64, 2 layers, 4 heads,
    /// vocabulary 256).
    pub fn tiny(family: Family) -> Self {
        match family {
            Family::Gpt2 => ModelConfig::Gpt2(gpt2::Config::tiny()),
            Family::Llama => ModelConfig::Llama(llama::Config::tiny()),
            Family::Bloom => ModelConfig::Bloom(bloom::Config::tiny()),
            Family::GptBigcode => ModelConfig::GptBigcode(gpt_bigcode::Config::tiny()),
            Family::T5 => ModelConfig::T5(t5::Config::tiny()),
            Family::Qwen2 => ModelConfig::Qwen2(qwen2::Config::tiny()),
            Family::Mistral => ModelConfig::Mistral(mistral::Config::tiny()),
            Family::Qwen3 => ModelConfig::Qwen3(qwen3::Config::tiny()),
            Family::Phi3 => ModelConfig::Phi3(phi3::Config::tiny()),
            Family::GptNeox => ModelConfig::GptNeox(gpt_neox::Config::tiny()),
            Family::Gemma2 => ModelConfig::Gemma2(gemma2::Config::tiny()),
            Family::Gemma3 => ModelConfig::Gemma3(gemma3::Config::tiny()),
        }
    }

    /// Parse a Hugging Face `config.json`, choosing the family from `model_type`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                EngineError::Config("config.json: missing string field `model_type`".into())
            })?;
        let family = Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
            .ok_or_else(|| {
                EngineError::Config(format!(
                    "config.json: unsupported model_type `{model_type}`; supported: {}",
                    Family::ALL.map(|f| f.model_type()).join(", ")
                ))
            })?;
        let err =
            |e: serde_json::Error| EngineError::Config(format!("config.json ({model_type}): {e}"));
        let v = with_defaults(v, family.hf_defaults());
        let cfg = match family {
            Family::Gpt2 => ModelConfig::Gpt2(serde_json::from_value(v).map_err(err)?),
            Family::Llama => ModelConfig::Llama(serde_json::from_value(v).map_err(err)?),
            Family::Bloom => ModelConfig::Bloom(serde_json::from_value(v).map_err(err)?),
            Family::GptBigcode => ModelConfig::GptBigcode(serde_json::from_value(v).map_err(err)?),
            Family::T5 => ModelConfig::T5(serde_json::from_value(v).map_err(err)?),
            Family::Qwen2 => ModelConfig::Qwen2(serde_json::from_value(v).map_err(err)?),
            Family::Mistral => ModelConfig::Mistral(serde_json::from_value(v).map_err(err)?),
            Family::Qwen3 => ModelConfig::Qwen3(serde_json::from_value(v).map_err(err)?),
            Family::Phi3 => ModelConfig::Phi3(serde_json::from_value(v).map_err(err)?),
            Family::GptNeox => ModelConfig::GptNeox(serde_json::from_value(v).map_err(err)?),
            Family::Gemma2 => ModelConfig::Gemma2(serde_json::from_value(v).map_err(err)?),
            Family::Gemma3 => ModelConfig::Gemma3(serde_json::from_value(v).map_err(err)?),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Gpt2(_) => Family::Gpt2,
            ModelConfig::Llama(_) => Family::Llama,
            ModelConfig::Bloom(_) => Family::Bloom,
            ModelConfig::GptBigcode(_) => Family::GptBigcode,
            ModelConfig::T5(_) => Family::T5,
            ModelConfig::Qwen2(_) => Family::Qwen2,
            ModelConfig::Mistral(_) => Family::Mistral,
            ModelConfig::Qwen3(_) => Family::Qwen3,
            ModelConfig::Phi3(_) => Family::Phi3,
            ModelConfig::GptNeox(_) => Family::GptNeox,
            ModelConfig::Gemma2(_) => Family::Gemma2,
            ModelConfig::Gemma3(_) => Family::Gemma3,
        }
    }

    /// The cache geometry; a Llama-like family's is its Llama decoder's
    /// (`llama::Config::geometry`).
    pub fn geometry(&self) -> ModelGeometry {
        match self {
            ModelConfig::Gpt2(c) => c.geometry(),
            ModelConfig::Llama(c) => c.geometry(),
            ModelConfig::Bloom(c) => c.geometry(),
            ModelConfig::GptBigcode(c) => c.geometry(),
            ModelConfig::T5(c) => c.geometry(),
            ModelConfig::Qwen2(c) => c.decoder().0.geometry(),
            ModelConfig::Mistral(c) => c.decoder().0.geometry(),
            ModelConfig::Qwen3(c) => c.decoder().0.geometry(),
            ModelConfig::Phi3(c) => c.decoder().0.geometry(),
            ModelConfig::GptNeox(c) => c.geometry(),
            ModelConfig::Gemma2(c) => c.geometry(),
            ModelConfig::Gemma3(c) => c.geometry(),
        }
    }

    /// The MLP's inner width (`n_inner`, `intermediate_size`, `d_ff`; GPT-2-style
    /// configs without one use 4 x hidden).
    pub fn mlp_width(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.decoder().inner,
            ModelConfig::GptBigcode(c) => c.decoder().inner,
            ModelConfig::Llama(c) => c.core.sizes.intermediate_size,
            ModelConfig::T5(c) => c.d_ff,
            ModelConfig::Bloom(c) => 4 * c.hidden_size,
            ModelConfig::Qwen2(c) => c.core.sizes.intermediate_size,
            ModelConfig::Mistral(c) => c.core.sizes.intermediate_size,
            ModelConfig::Qwen3(c) => c.core.sizes.intermediate_size,
            ModelConfig::Phi3(c) => c.core.sizes.intermediate_size,
            ModelConfig::GptNeox(c) => c.sizes.intermediate_size,
            ModelConfig::Gemma2(c) => c.core.sizes.intermediate_size,
            ModelConfig::Gemma3(c) => c.core.sizes.intermediate_size,
        }
    }

    /// Reject configurations that cannot describe a model.
    pub fn validate(&self) -> Result<()> {
        let g = self.geometry();
        let bad = |m: String| Err(EngineError::Config(m));
        if g.num_layers == 0 || g.hidden_size == 0 || g.vocab_size == 0 {
            return bad(format!(
                "{}: layers, hidden size and vocabulary must be at least 1",
                self.family().name()
            ));
        }
        if g.num_attention_heads == 0 || g.num_kv_heads == 0 || g.head_dim == 0 {
            return bad(format!(
                "{}: heads and head_dim must be at least 1",
                self.family().name()
            ));
        }
        match self {
            ModelConfig::Phi3(c) => c.check()?,
            ModelConfig::GptNeox(c) => c.check()?,
            ModelConfig::Gemma2(c) => c.check()?,
            ModelConfig::Gemma3(c) => c.decoder().map(|_| ())?,
            _ => {}
        }
        let explicit_head_dim = match self {
            ModelConfig::Llama(c) => c.head_dim.is_some(),
            ModelConfig::Mistral(c) => c.head_dim.is_some(),
            ModelConfig::T5(_)
            | ModelConfig::Qwen3(_)
            | ModelConfig::Gemma2(_)
            | ModelConfig::Gemma3(_) => true,
            _ => false,
        };
        if !explicit_head_dim && !g.hidden_size.is_multiple_of(g.num_attention_heads) {
            return bad(format!(
                "{}: {} attention heads do not divide the hidden size {}",
                self.family().name(),
                g.num_attention_heads,
                g.hidden_size
            ));
        }
        if !g.num_attention_heads.is_multiple_of(g.num_kv_heads) {
            return bad(format!(
                "{}: {} attention heads are not a multiple of {} key/value heads",
                self.family().name(),
                g.num_attention_heads,
                g.num_kv_heads
            ));
        }
        Ok(())
    }

    /// Build the model, reading weights by their Hugging Face names from `vb`.
    pub fn build(&self, vb: VarBuilder) -> Result<Box<dyn Model>> {
        self.validate()?;
        Ok(match self {
            ModelConfig::Gpt2(c) => Box::new(gpt2::Gpt2::load(c.decoder(), vb)?),
            ModelConfig::Bloom(c) => Box::new(bloom::Bloom::load(c, vb)?),
            ModelConfig::GptBigcode(c) => Box::new(gpt2::Gpt2::load(c.decoder(), vb)?),
            ModelConfig::T5(c) => Box::new(t5::T5::load(c, vb)?),
            ModelConfig::Llama(_)
            | ModelConfig::Qwen2(_)
            | ModelConfig::Mistral(_)
            | ModelConfig::Qwen3(_)
            | ModelConfig::Phi3(_) => {
                let (cfg, block) = self
                    .decoder()
                    .expect("a Llama-like family has a Llama decoder");
                Box::new(llama::Llama::load_block(&cfg, block, vb)?)
            }
            ModelConfig::GptNeox(c) => Box::new(gpt_neox::GptNeox::load(c, vb)?),
            ModelConfig::Gemma2(c) => Box::new(gemma2::Gemma2::load(c, vb)?),
            ModelConfig::Gemma3(c) => {
                let (cfg, block) = c.decoder()?;
                Box::new(gemma2::Gemma2::load_block(&cfg, block, vb)?)
            }
        })
    }

    /// The Llama decoder and block of a Llama-like family (`llama`, `qwen2`,
    /// `mistral`, `qwen3`, `phi3`); `None` for the others.
    pub fn decoder(&self) -> Option<(llama::Config, llama::Block)> {
        match self {
            ModelConfig::Llama(c) => Some((c.clone(), llama::Block::llama(c))),
            ModelConfig::Qwen2(c) => Some(c.decoder()),
            ModelConfig::Mistral(c) => Some(c.decoder()),
            ModelConfig::Qwen3(c) => Some(c.decoder()),
            ModelConfig::Phi3(c) => Some(c.decoder()),
            _ => None,
        }
    }
}

/// Use `vb.pp(prefix)` when the checkpoint nests the backbone under `prefix` (a
/// `*ForCausalLM` saved with `save_pretrained`), the root otherwise (a bare backbone
/// such as the original `gpt2` checkpoint).
pub fn backbone<'a>(vb: &VarBuilder<'a>, prefix: &str, probe: &str) -> VarBuilder<'a> {
    if vb.contains_tensor(&format!("{prefix}.{probe}")) || !vb.contains_tensor(probe) {
        vb.pp(prefix)
    } else {
        vb.clone()
    }
}

/// Position of each query token, per row, as transformers derives it from the
/// attention mask: `cumsum(mask) - 1` over the prefix-extended mask `[B, T]` (so real
/// tokens start at P and left padding does not shift them), 1 on padding. When the
/// mask does not cover `start + s` columns (a mask-width bug), positions fall back to
/// `start..start+s` and the attention reports the mismatch. Returns `[B][S]`.
pub fn row_positions(mask: &Tensor, start: usize, s: usize) -> Result<Vec<Vec<u32>>> {
    use crate::engine::diagnosis::CandleExt;
    let rows: Vec<Vec<f32>> = mask
        .to_dtype(candle_core::DType::F32)
        .and_then(|m| m.to_vec2())
        .ctx("positions from the attention mask")?;
    Ok(rows
        .iter()
        .map(|row| {
            if row.len() != start + s {
                return (start..start + s).map(|p| p as u32).collect();
            }
            let mut count = 0u32;
            let mut out = Vec::with_capacity(s);
            for (j, m) in row.iter().enumerate() {
                let visible = *m > 0.5;
                count += u32::from(visible);
                if j >= start {
                    out.push(if visible { count - 1 } else { 1 });
                }
            }
            out
        })
        .collect())
}

#[cfg(test)]
mod tests;
