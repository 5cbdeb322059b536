//! Llama: rotary positions (RoPE, Hugging Face's non-interleaved `rotate_half`
//! convention), grouped-query attention, an explicit `head_dim` that may differ from
//! `hidden_size / num_attention_heads`, RMSNorm, SwiGLU MLP and an optional sliding
//! window. Parameter names follow `LlamaForCausalLM`.
//!
//! The decoder here is shared by the Llama-like families: [`Block`] says what a family
//! changes (biases on q/k/v and o, a per-head RMSNorm on queries and keys, the
//! attention window of each layer), and `qwen2`, `mistral` and `qwen3` are each a
//! config file that maps its `config.json` onto a [`Config`] and a [`Block`].
//!
//! Cache geometry: `[B, num_key_value_heads, S, head_dim]`. The P virtual tokens occupy
//! positions `0..P`; real tokens are rotated for positions `P..P+S`. Prefix keys enter
//! the cache as given, without RoPE (as PEFT's prefix does in transformers).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{
    cached_keys, cached_self_attention, merge_heads, sdpa_detached, CachedStep, Scores,
};
use super::kernels;
use super::mlp::GatedMlp;
use super::nn::{
    block_ops, default_inv_freq, embed, inv_freq_tensor, pass_rope_tables, rms_norm, Linear,
};
use super::projections::{LoadHeadNorm, ProjectionSpec, Projections, Qkv};
use super::weights::{lm_head, ones, weight};
use super::{backbone, Facts, Family, Forward, Model, ModelGeometry, Sizes};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result, Site, TensorKind};

/// `LlamaConfig` (Hugging Face field names). Fields this harness does not use
/// (`architectures`, `torch_dtype`, `bos_token_id`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: Core,
    /// Per-head dimension; `None` means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Attention window (query at p sees keys in (p - W, p]); a sliding cache's own
    /// window takes precedence.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// What every Llama-like `config.json` gives under the same names: the sizes, the
/// key/value heads, the MLP's activation, the RMSNorm epsilon and RoPE. The configs of
/// llama, qwen2, qwen3, mistral and phi3 hold it flattened (`#[serde(flatten)] pub
/// core: Core`); what is left in each is the family's own. (The serde defaults here
/// are Llama's; the other families' defaults files give every field.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Core {
    #[serde(flatten)]
    pub sizes: Sizes,
    /// GQA/MQA key/value heads; `None` means `num_attention_heads` (plain MHA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(flatten)]
    pub rope: Rope,
}

impl Core {
    /// `num_key_value_heads`, or `num_attention_heads` when null.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads
            .unwrap_or(self.sizes.num_attention_heads)
    }
}

/// A Llama-like config's RoPE settings, under transformers' names; the configs of
/// llama, qwen2, qwen3, mistral and phi3 hold them flattened (`#[serde(flatten)] pub
/// rope: Rope`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// transformers < 5: `{"rope_type" | "type": "linear" | "llama3", "factor": ..}`
    /// (Llama 3.x: `llama3` with `low_freq_factor`, `high_freq_factor`,
    /// `original_max_position_embeddings`). Written as `null` when absent, so that a
    /// scenario's `model.config` can set it; transformers 5 reads it into
    /// `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<Box<RopeParameters>>,
    /// transformers >= 5: `{"rope_theta": .., "rope_type": ..}` (replaces both
    /// `rope_theta` and `rope_scaling` when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Box<RopeParameters>>,
}

impl Rope {
    /// RoPE base: `rope_parameters.rope_theta` (transformers >= 5) or `rope_theta`.
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rope_theta)
    }

    fn scaling(&self) -> Option<&RopeParameters> {
        self.rope_parameters
            .as_deref()
            .or(self.rope_scaling.as_deref())
    }

    /// RoPE inverse frequencies `1 / theta^(2i/d)` for `i < d/2` (`d`: the head
    /// dimension), with the scaling of
    /// `rope_type` (`default`, `linear`, `llama3`), computed in f64.
    fn inv_freq(&self, d: usize) -> Result<Vec<f64>> {
        let base = default_inv_freq(self.theta(), d);
        let Some(r) = self.scaling() else {
            return Ok(base);
        };
        r.full_rotary("llama")?;
        let need = |v: Option<f64>, name: &str| {
            v.ok_or_else(|| {
                EngineError::Config(format!("llama: rope_type `{}` needs `{name}`", r.kind()))
            })
        };
        match r.kind() {
            "default" => Ok(base),
            "linear" => {
                let factor = need(r.factor, "factor")?;
                Ok(base.into_iter().map(|f| f / factor).collect())
            }
            "llama3" => {
                // transformers `_compute_llama3_parameters`.
                let factor = need(r.factor, "factor")?;
                let low = need(r.low_freq_factor, "low_freq_factor")?;
                let high = need(r.high_freq_factor, "high_freq_factor")?;
                let old = need(
                    r.original_max_position_embeddings.map(|v| v as f64),
                    "original_max_position_embeddings",
                )?;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                Ok(base
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect())
            }
            other => Err(EngineError::Config(format!(
                "llama: rope_type `{other}` is not supported (supported: default, linear, llama3)"
            ))),
        }
    }
}

/// RoPE parameters: transformers' `rope_scaling` (before 5.0) or `rope_parameters`, for
/// every family that reads them (the Llama decoder's, Gemma 2 and 3, GPT-NeoX); each
/// family refuses the types and fields it does not run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// RoPE on the first `partial_rotary_factor * head_dim` dimensions of each head:
    /// GPT-NeoX reads it; every other family refuses a value other than 1
    /// ([`RopeParameters::full_rotary`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

impl RopeParameters {
    /// Refuse a `partial_rotary_factor` other than 1 in a family (`family`) that rotates
    /// whole heads: ignoring it would run other positions than transformers does.
    pub fn full_rotary(&self, family: &str) -> Result<()> {
        match self.partial_rotary_factor {
            Some(f) if f != 1.0 => Err(EngineError::Config(format!(
                "{family}: rope_parameters.partial_rotary_factor {f} is not supported (only 1)"
            ))),
            _ => Ok(()),
        }
    }

    /// The RoPE type: `rope_type`, else the older `type`, else `default`.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }
}

fn default_eps() -> f64 {
    1e-6
}

fn default_theta() -> f64 {
    10_000.0
}

fn default_act() -> String {
    "silu".into()
}

impl Config {
    /// The plain Llama decoder over `core`: `head_dim` from hidden / heads, no
    /// biases, no window. A Llama-like family's `decoder()` starts from it and sets
    /// what its `config.json` changes (`..Config::plain(&self.core)`).
    pub fn plain(core: &Core) -> Self {
        Self {
            core: core.clone(),
            head_dim: None,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
        }
    }

    /// Hidden 64, 2 layers, 4 attention heads over 2 KV heads, and `head_dim` 24
    /// (deliberately not 64 / 4) so that an explicit `head_dim` is always exercised.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/llama.json"))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.core.num_kv_heads()
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.core.sizes.hidden_size / self.core.sizes.num_attention_heads.max(1))
    }

    pub fn geometry(&self) -> ModelGeometry {
        self.core
            .sizes
            .rope_geometry(self.num_kv_heads(), self.head_dim())
    }

    /// What `ModelConfig::validate` cannot see: head_dim even (RoPE rotates pairs),
    /// the activation, the RoPE type, the windows of `block` (`name`: the family).
    pub(crate) fn check(&self, block: &Block) -> Result<()> {
        let name = block.family.name();
        let d = self.head_dim();
        if !d.is_multiple_of(2) {
            return Err(EngineError::Config(format!(
                "{name}: head_dim {d} must be even (RoPE rotates pairs of dimensions)"
            )));
        }
        if self.core.hidden_act != "silu" {
            return Err(EngineError::Config(format!(
                "{name}: hidden_act `{}` is not supported (only silu)",
                self.core.hidden_act
            )));
        }
        if block.windows.contains(&Some(0)) {
            return Err(EngineError::Config(format!(
                "{name}: sliding_window must be at least 1"
            )));
        }
        if block.windows.len() != self.core.sizes.num_hidden_layers {
            return Err(EngineError::Config(format!(
                "{name}: {} layer attention types for {} layers",
                block.windows.len(),
                self.core.sizes.num_hidden_layers
            )));
        }
        self.core
            .rope
            .inv_freq(self.head_dim())
            .map_err(|e| match e {
                EngineError::Config(m) => EngineError::Config(m.replacen("llama", name, 1)),
                other => other,
            })?;
        Ok(())
    }
}

/// What a Llama-like family changes in the decoder block. `Llama` is the plain case
/// ([`Block::llama`]); the other families build theirs from their `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The family the model reports (`Model::family`).
    pub family: Family,
    /// Biases on `q_proj`, `k_proj`, `v_proj` (`[H*D]`, `[KVH*D]`, `[KVH*D]`).
    pub qkv_bias: bool,
    /// Bias on `o_proj` (`[E]`).
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys (`self_attn.q_norm`, `self_attn.k_norm`,
    /// weights `[D]`), applied to `[B, H, S, D]` before RoPE (Qwen3). The prefix keys
    /// are not normalised (they enter the cache as given, like the un-rotated prefix).
    pub qk_norm: bool,
    /// The attention window of each layer from the config (`None`: full attention):
    /// query at p sees keys in (p - W, p]. A cache's own window (`cache.window`)
    /// replaces it in every layer.
    pub windows: Vec<Option<usize>>,
    /// Fused projections (Phi-3): `self_attn.qkv_proj` `[H*D + 2*KVH*D, E]` (q, k, v
    /// along the output dimension) and `mlp.gate_up_proj` `[2*I, E]` (gate, then up),
    /// split into the separate projections when loaded. No biases.
    pub fused: bool,
}

impl Block {
    /// `LlamaForCausalLM`: `attention_bias` on q/k/v and o, no q/k norm, the config's
    /// `sliding_window` (if any) in every layer.
    pub fn llama(cfg: &Config) -> Self {
        Self {
            family: Family::Llama,
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            qk_norm: false,
            windows: vec![cfg.sliding_window; cfg.core.sizes.num_hidden_layers],
            fused: false,
        }
    }
}

struct Layer {
    /// `[E]`
    input_layernorm: Tensor,
    /// q, k, v, o; the per-head q/k norms with [`Block::qk_norm`].
    attn: Projections,
    /// `[E]`
    post_attention_layernorm: Tensor,
    /// gate/up/down, `[E, I]`, `[E, I]`, `[I, E]`, with `mlp_bias`
    mlp: GatedMlp,
}

pub struct Llama {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    cfg: Config,
    block: Block,
    /// `[V, E]`
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    /// `[E]`
    norm: Tensor,
    /// `Linear` `[E, V]` (the embedding table transposed when `tie_word_embeddings`)
    lm_head: Linear,
    /// RoPE inverse frequencies `[1, D/2]` (f32, as transformers computes them).
    inv_freq: Tensor,
}

/// An RMSNorm weight `[size]` by name (starts at one).
fn rms_weight(vb: &VarBuilder, name: &str, size: usize) -> Result<Tensor> {
    ones(vb, size, name).ctx(name)
}

impl Llama {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::load_block(cfg, Block::llama(cfg), vb)
    }

    /// A Llama-like model of `block.family`: the Llama decoder with `block`'s biases,
    /// q/k norm and windows.
    pub fn load_block(cfg: &Config, block: Block, vb: VarBuilder) -> Result<Self> {
        cfg.check(&block)?;
        let root = vb.clone();
        let vb = backbone(&vb, "model", "embed_tokens.weight");
        let (e, inter) = (cfg.core.sizes.hidden_size, cfg.core.sizes.intermediate_size);
        let (heads, kvh, d) = (
            cfg.core.sizes.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        let embed_tokens = weight(&vb, (cfg.core.sizes.vocab_size, e), "embed_tokens.weight")
            .ctx("embed_tokens")?;
        let mut layers = Vec::with_capacity(cfg.core.sizes.num_hidden_layers);
        let spec = ProjectionSpec {
            hidden: e,
            heads: (heads, kvh, d),
            qkv_bias: block.qkv_bias,
            o_bias: block.o_bias,
            fused_qkv: block.fused,
            head_norm: block.qk_norm.then_some(rms_weight as LoadHeadNorm),
        };
        for i in 0..cfg.core.sizes.num_hidden_layers {
            let p = format!("layers.{i}");
            let norm = |n: &str| rms_weight(&vb, &format!("{p}.{n}.weight"), e);
            layers.push(Layer {
                input_layernorm: norm("input_layernorm")?,
                attn: Projections::load(&vb, &p, &spec)?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                mlp: GatedMlp::load(&vb, &p, (e, inter), cfg.mlp_bias, block.fused)?,
            });
        }
        let norm = ones(&vb, e, "norm.weight").ctx("norm")?;
        let tied = cfg.core.sizes.tie_word_embeddings;
        let lm_head = lm_head(&root, "lm_head", &embed_tokens, "embed_tokens", tied)?;
        let inv = cfg.core.rope.inv_freq(cfg.head_dim())?;
        let inv_freq = inv_freq_tensor(&inv, embed_tokens.device())?;
        Ok(Self {
            facts: Facts::windowed(block.family, cfg.geometry(), block.windows.clone()),
            cfg: cfg.clone(),
            block,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Layer `i`'s attention sub-block with its residual: `h + o(attention(rope(q(n)),
    /// keys, values))`, `n = rms_norm(h)`, the new keys and values going through the
    /// cache. `h: [B, S, E]`, `cos, sin: [B, 1, S, D]` -> `[B, S, E]`. With
    /// [`Block::qk_norm`] the queries and keys are RMS-normalised per head before RoPE
    /// (in the block op too).
    ///
    /// In [`super::Ops::Kernels`] with the crate's kernels (f32 on the CPU,
    /// [`super::nn::block_ops`]) the block is computed outside the graph and, when
    /// training, joins it as one node with its own backward pass
    /// ([`kernels::AttentionBlock`]); otherwise it is composed from differentiable ops
    /// (`fw.ops`' own). Both give the same values.
    fn self_attention(
        &self,
        fw: &mut Forward,
        step: CachedStep,
        l: &Layer,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let i = step.layer;
        let att = Attention::SelfAttn;
        let site_q = Site::new(i, att, TensorKind::Query);
        let site_v = Site::new(i, att, TensorKind::Value);
        let (eps, ops) = (self.cfg.core.rms_norm_eps, fw.ops);
        let block = block_ops(h, &[&l.input_layernorm], ops);
        // [B, S, E]: outside the graph for the block op
        let x = if block { h.detach() } else { h.clone() };
        let a = rms_norm(&x, &l.input_layernorm, eps, ops).at(site_q, "input_layernorm")?;
        // q [B, H, S, D], k and v [B, KVH, S, D]
        let Qkv { q, k, v, projected } = l.attn.qkv(&a, eps, (cos, sin), i, ops)?;
        let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
        if !block {
            // [B, H, S, D]
            let o = cached_self_attention(fw, step, &q, &k, &v, scale, &mut |_, _| Ok(None))?;
            // [B, S, E]
            let o = merge_heads(&o)
                .and_then(|o| l.attn.o_proj.forward(&o))
                .at(site_q, "o_proj")?;
            return (h + o).at(site_q, "residual");
        }
        // view.k, view.v: [B, KVH, K, D], the S new positions last; mask [B, 1, S, K]
        let (view, mask) = cached_keys(fw, step, &k, &v)?;
        // out [B, H, S, D], probs [B, H, S, K]
        let scores = Scores::new(&mask, scale, i, att, ops);
        let (out, probs) = sdpa_detached(&q, &view.k, &view.v, &scores)?;
        // [B, S, E]
        let branch = merge_heads(&out)
            .and_then(|o| l.attn.o_proj.forward(&o))
            .at(site_q, "o_proj")?;
        if !(h.track_op() || view.k.track_op() || view.v.track_op()) {
            return (x + branch).at(site_q, "residual");
        }
        let Some(probs) = probs else {
            // sdpa_detached keeps the probabilities whenever the shapes it has just
            // checked hold and the crate's softmax runs, which `block` ensures.
            return Err(EngineError::Config(format!(
                "llama layer {i}: the attention probabilities were not kept for the backward pass"
            )));
        };
        let rms = |w: &Tensor| kernels::Norm {
            w: w.clone(),
            b: None,
            eps: eps as f32,
            centred: false,
        };
        // The per-head norms with the heads they normalised, [B, H or KVH, S, D].
        let head_norm = |w: &Option<Tensor>, heads: &Tensor| -> Result<_> {
            let Some(w) = w else { return Ok(None) };
            let heads = heads.contiguous().at(site_q, "projected heads")?;
            Ok(Some((rms(w), heads)))
        };
        let (q_heads, k_heads) = &projected;
        let op = kernels::AttentionBlock {
            branch,
            q: q.contiguous().at(site_q, "queries")?,
            probs,
            scale: scale as f32,
            norm: rms(&l.input_layernorm),
            rope: kernels::Rope {
                cos: cos.contiguous().at(site_q, "rope tables")?,
                sin: sin.contiguous().at(site_q, "rope tables")?,
            },
            q_norm: head_norm(&l.attn.q_norm, q_heads)?,
            k_norm: head_norm(&l.attn.k_norm, k_heads)?,
            q_proj: l.attn.q_proj.clone(),
            k_proj: l.attn.k_proj.clone(),
            v_proj: l.attn.v_proj.clone(),
            o_proj: l.attn.o_proj.clone(),
        };
        h.contiguous()
            .and_then(|h| h.apply_op3(&view.k, &view.v, op))
            .at(site_v, "attention block")
    }
}

impl Model for Llama {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (s, past) = fw.span(ids)?;
        let eps = self.cfg.core.rms_norm_eps;
        // [B, 1, S, D] each: real tokens sit at positions P.. (after the prefix).
        let (cos, sin) = pass_rope_tables(fw, past, s, &self.inv_freq, self.embed_tokens.dtype())?;
        // [B, S, E]
        let mut h = embed(&self.embed_tokens, ids).ctx("embed_tokens")?;
        for (i, l) in self.layers.iter().enumerate() {
            let site_q = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            // Keys visible to a query: the cache's window, else this layer's own.
            let step = CachedStep::new(fw, i, past, self.block.windows[i]);
            h = self.self_attention(fw, step, l, &h, (&cos, &sin))?;
            // [B, S, E]: down(silu(gate(x)) * up(x))
            let norm = (&l.post_attention_layernorm, eps);
            h = l
                .mlp
                .swiglu_residual(&h, norm, fw.ops)
                .at(site_q, "mlp + residual")?;
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        rms_norm(&fw.kept_positions(&h)?, &self.norm, eps, fw.ops)
            .and_then(|h| self.lm_head.forward(&h))
            .ctx("lm head")
    }
}
