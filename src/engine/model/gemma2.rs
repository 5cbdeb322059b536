//! Gemma 2 (text): a decoder of its own, close to Llama's but with
//!
//! - RMSNorm scaled by `(1 + w)` (weights start at zero in transformers), computed in
//!   f32; four per layer: `input_layernorm` before attention, `post_attention_layernorm`
//!   on the attention output before the residual add, `pre_feedforward_layernorm` and
//!   `post_feedforward_layernorm` around the MLP;
//! - embeddings scaled by `sqrt(hidden_size)` (as the embedding's dtype: f32 here);
//! - a GELU-tanh gated MLP, `down(gelu_tanh(gate(x)) * up(x))`;
//! - grouped-query attention with an explicit `head_dim` (independent of hidden /
//!   heads), scaled by `query_pre_attn_scalar ** -0.5` (not `head_dim ** -0.5`), and
//!   the scaled scores soft-capped, `cap * tanh(x / cap)` (`attn_logit_softcapping`),
//!   before the mask and the softmax ([`softcapped_sdpa`]);
//! - the final logits soft-capped the same way (`final_logit_softcapping`);
//! - tied embeddings, default RoPE;
//! - sliding-window attention in some layers: transformers >= 5 reads `layer_types`
//!   (`"sliding_attention"` / `"full_attention"`); without it (and in transformers
//!   4.x, which ignores `layer_types`) the even layers `0, 2, 4, ..` slide. Both
//!   versions mask keys outside `(p - W, p]` for a query at position p.
//!
//! The decoder is shared with Gemma 3 (`super::gemma3`): a [`Block`] says what a
//! family changes (a per-head (1 + w) RMSNorm on queries and keys, the RoPE
//! frequencies of the sliding and the global layers, the windows).
//!
//! Parameter names follow `Gemma2ForCausalLM`. Cache geometry:
//! `[B, num_key_value_heads, S, head_dim]`. The P virtual tokens occupy positions
//! `0..P`; prefix keys enter the cache without RoPE (as PEFT's prefix does).

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::attention::{cached_keys, merge_heads, softcapped_sdpa, CachedStep, Scores};
use super::llama::RopeParameters;
use super::mlp::GatedMlp;
use super::nn::{default_inv_freq, embed, inv_freq_tensor, rms_norm, rope_tables_at, Linear, Ops};
use super::projections::{LoadHeadNorm, ProjectionSpec, Projections, Qkv};
use super::weights::{lm_head, weight};
use super::{backbone, row_positions, Facts, Family, Forward, Gelu, Model, ModelGeometry, Sizes};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result, Site, TensorKind};

/// `Gemma2Config` (Hugging Face field names; transformers 5's defaults, Gemma-2-2B's
/// geometry. transformers 4.46's defaults differ: hidden 3072, 28 layers, 16 heads over
/// 16 KV heads, intermediate 24576, `query_pre_attn_scalar` 224).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: Core,
    /// transformers >= 5: `{"rope_theta", "rope_type"}`; only `default` is supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Box<RopeParameters>>,
    #[serde(flatten)]
    pub attn: Attn,
    #[serde(flatten)]
    pub caps: SoftCaps,
}

/// What Gemma 2's and Gemma 3's `config.json` share under the same names, in three
/// parts because each family writes fields of its own between them (`config.json` keeps
/// its field order): the sizes, heads, MLP activation, RMSNorm epsilon and RoPE base
/// ([`Core`]); then, after the family's RoPE fields, the attention's biases, scale and
/// windows ([`Attn`]); then the soft-caps ([`SoftCaps`]). Both configs hold each part
/// flattened (`#[serde(flatten)]`); their defaults come from the defaults files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Core {
    #[serde(flatten)]
    pub sizes: Sizes,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// `gelu_pytorch_tanh` (and the other tanh spellings `gelu_new`, `gelu_fast`), or
    /// `gelu` (erf).
    pub hidden_activation: String,
    pub rms_norm_eps: f64,
    /// RoPE base (Gemma 3: of the global layers).
    pub rope_theta: f64,
}

/// The attention fields of a Gemma `config.json` (see [`Core`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attn {
    /// Biases on q/k/v and o.
    pub attention_bias: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar ** -0.5` (an int in
    /// transformers 5's strict config).
    pub query_pre_attn_scalar: usize,
    /// Absent: 4096; `null`: no window.
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` | `"full_attention"` per layer; `null`: the family's
    /// default (Gemma 2: even layers slide).
    pub layer_types: Option<Vec<String>>,
}

/// The soft-caps of a Gemma `config.json` (see [`Core`]): `cap * tanh(x / cap)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoftCaps {
    /// Gemma 2 absent: 30; `null`: no final soft-capping.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2 absent: 50; `null`: no attention soft-capping.
    pub attn_logit_softcapping: Option<f64>,
}

impl Core {
    pub fn geometry(&self) -> ModelGeometry {
        self.sizes
            .rope_geometry(self.num_key_value_heads, self.head_dim)
    }
}

/// Seeded norm weights (the `w` of `(1 + w)`): random around zero, as trained Gemma
/// norms are, so that a norm loaded into another's slot, or a missing `+ 1`, changes
/// the logits.
const NORM_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.1,
};

impl Config {
    /// Hidden 64, 3 layers (0 and 2 slide, 1 is global), 4 attention heads over 2 KV
    /// heads, head_dim 24 (not 64 / 4 = 16), `query_pre_attn_scalar` 16 (hidden /
    /// heads, not head_dim, as Gemma-2-27B's 144 against head_dim 128), intermediate
    /// 96, vocabulary 256, a window of 8 (shorter than prefix + prompt in the
    /// scenarios), and soft-caps small enough to bend the tiny model's scores and
    /// logits (attention 4, final 3).
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/gemma2.json"))
    }

    pub fn geometry(&self) -> ModelGeometry {
        self.core.geometry()
    }

    /// The attention window of each layer (module docs): `layer_types` when given,
    /// else the even layers.
    pub fn windows(&self) -> Result<Vec<Option<usize>>> {
        let Some(types) = &self.attn.layer_types else {
            return Ok((0..self.core.sizes.num_hidden_layers)
                .map(|i| self.attn.sliding_window.filter(|_| i % 2 == 0))
                .collect());
        };
        if types.len() != self.core.sizes.num_hidden_layers {
            return Err(EngineError::Config(format!(
                "gemma2: {} layer_types for {} layers",
                types.len(),
                self.core.sizes.num_hidden_layers
            )));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(self.attn.sliding_window),
                "full_attention" => Ok(None),
                other => Err(EngineError::Config(format!(
                    "gemma2: layer type `{other}` is not supported (sliding_attention, full_attention)"
                ))),
            })
            .collect()
    }

    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.core.rope_theta)
    }

    /// What `ModelConfig::validate`'s geometry checks cannot see.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(format!("gemma2: {m}")));
        if !self.core.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even (RoPE rotates pairs of dimensions)",
                self.core.head_dim
            ));
        }
        if !Gelu::NAMES.contains(&self.core.hidden_activation.as_str()) {
            return bad(format!(
                "hidden_activation `{}` is not supported (gelu_pytorch_tanh, gelu_new, gelu_fast, gelu)",
                self.core.hidden_activation
            ));
        }
        if let Some(r) = self.rope_parameters.as_deref() {
            r.full_rotary("gemma2")?;
            if r.kind() != "default" {
                return bad(format!(
                    "rope_type `{}` is not supported (only default)",
                    r.kind()
                ));
            }
        }
        if self.attn.query_pre_attn_scalar == 0 {
            return bad("query_pre_attn_scalar must be at least 1".into());
        }
        let caps = [
            self.caps.attn_logit_softcapping,
            self.caps.final_logit_softcapping,
        ];
        if caps.into_iter().flatten().any(|c| c.is_nan() || c <= 0.0) {
            return bad("soft-capping values must be positive (or null)".into());
        }
        if self.attn.sliding_window == Some(0) {
            return bad("sliding_window must be at least 1".into());
        }
        self.windows().map(|_| ())
    }
}

/// `cap * tanh(x / cap)`, or `x` without a cap: `x: [..]` -> `[..]`.
pub fn soft_cap(x: &Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

/// What a Gemma family changes in the decoder ([`Block::gemma2`] is Gemma 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The family the model reports (`Model::family`).
    pub family: Family,
    /// Per-head (1 + w) RMSNorm on queries and keys (`self_attn.q_norm`,
    /// `self_attn.k_norm`, weights `[D]`), on `[B, H, S, D]` before RoPE (Gemma 3).
    /// The prefix keys are not normalised (they enter the cache as given).
    pub qk_norm: bool,
    /// The attention window of each layer (`None`: full attention); a cache's own
    /// window (`cache.window`) replaces it in every layer.
    pub windows: Vec<Option<usize>>,
    /// The layers of type `sliding_attention`, which rotate with [`Block::rope_local`]
    /// (the others with [`Block::rope_global`]), whatever their window.
    pub sliding: Vec<bool>,
    /// RoPE inverse frequencies `[D/2]` of the global layers.
    pub rope_global: Vec<f64>,
    /// RoPE inverse frequencies `[D/2]` of the sliding layers.
    pub rope_local: Vec<f64>,
}

impl Block {
    /// `Gemma2ForCausalLM`: no q/k norm, one RoPE base for every layer.
    pub fn gemma2(cfg: &Config) -> Result<Self> {
        let windows = cfg.windows()?;
        let inv = default_inv_freq(cfg.theta(), cfg.core.head_dim);
        Ok(Self {
            family: Family::Gemma2,
            qk_norm: false,
            sliding: windows.iter().map(Option::is_some).collect(),
            windows,
            rope_global: inv.clone(),
            rope_local: inv,
        })
    }
}

/// One decoder layer's weights. Norms hold `1 + w` `[E]` (added once at load, in f32
/// like transformers' `1.0 + weight.float()`).
struct Layer {
    input_layernorm: Tensor,
    /// q, k, v, o; the per-head q/k norms (`1 + w` `[D]`) with [`Block::qk_norm`].
    attn: Projections,
    post_attention_layernorm: Tensor,
    pre_feedforward_layernorm: Tensor,
    post_feedforward_layernorm: Tensor,
    /// gate/up/down, `[E, I]`, `[E, I]`, `[I, E]`, without biases
    mlp: GatedMlp,
}

pub struct Gemma2 {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    cfg: Config,
    block: Block,
    /// `[V, E]`
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    /// `1 + w` `[E]`
    norm: Tensor,
    /// `Linear` `[E, V]` (the embedding table transposed when `tie_word_embeddings`)
    lm_head: Linear,
    /// RoPE inverse frequencies `[1, D/2]` (f32, as transformers computes them) of the
    /// global and of the sliding layers.
    inv_freq_global: Tensor,
    inv_freq_local: Tensor,
}

/// A Gemma RMSNorm weight `w: [E]` by name, returned as the scale it applies,
/// `1 + w` `[E]` (f32).
fn gemma_norm(vb: &VarBuilder, name: &str, e: usize) -> Result<Tensor> {
    vb.get_with_hints(e, name, NORM_INIT)
        .and_then(|w| w.to_dtype(DType::F32))
        .and_then(|w| w + 1.0)
        .ctx(name)
}

impl Gemma2 {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        Self::load_block(cfg, Block::gemma2(cfg)?, vb)
    }

    /// A Gemma model of `block.family`: the Gemma 2 decoder with `block`'s q/k norm,
    /// windows and RoPE frequencies.
    pub fn load_block(cfg: &Config, block: Block, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let n = cfg.core.sizes.num_hidden_layers;
        let half = cfg.core.head_dim / 2;
        if block.windows.len() != n
            || block.sliding.len() != n
            || block.rope_global.len() != half
            || block.rope_local.len() != half
        {
            return Err(EngineError::Config(format!(
                "{}: {} windows, {} layer types and {} / {} RoPE frequencies for {n} layers of head_dim {}",
                block.family.name(),
                block.windows.len(),
                block.sliding.len(),
                block.rope_global.len(),
                block.rope_local.len(),
                cfg.core.head_dim
            )));
        }
        let root = vb.clone();
        let vb = backbone(&vb, "model", "embed_tokens.weight");
        let (e, inter, ab) = (
            cfg.core.sizes.hidden_size,
            cfg.core.sizes.intermediate_size,
            cfg.attn.attention_bias,
        );
        let (heads, kvh, d) = (
            cfg.core.sizes.num_attention_heads,
            cfg.core.num_key_value_heads,
            cfg.core.head_dim,
        );
        let embed_tokens = weight(&vb, (cfg.core.sizes.vocab_size, e), "embed_tokens.weight")
            .ctx("embed_tokens")?;
        let mut layers = Vec::with_capacity(cfg.core.sizes.num_hidden_layers);
        let spec = ProjectionSpec {
            hidden: e,
            heads: (heads, kvh, d),
            qkv_bias: ab,
            o_bias: ab,
            fused_qkv: false,
            head_norm: block.qk_norm.then_some(gemma_norm as LoadHeadNorm),
        };
        for i in 0..cfg.core.sizes.num_hidden_layers {
            let p = format!("layers.{i}");
            let norm = |n: &str| gemma_norm(&vb, &format!("{p}.{n}.weight"), e);
            layers.push(Layer {
                input_layernorm: norm("input_layernorm")?,
                attn: Projections::load(&vb, &p, &spec)?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
                post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
                // no biases, not fused
                mlp: GatedMlp::load(&vb, &p, (e, inter), false, false)?,
            });
        }
        let norm = gemma_norm(&vb, "norm.weight", e)?;
        let tied = cfg.core.sizes.tie_word_embeddings;
        let lm_head = lm_head(&root, "lm_head", &embed_tokens, "embed_tokens", tied)?;
        // [1, D/2] each (f32)
        let table = |f: &[f64]| inv_freq_tensor(f, embed_tokens.device());
        Ok(Self {
            facts: Facts::windowed(block.family, cfg.geometry(), block.windows.clone()),
            cfg: cfg.clone(),
            inv_freq_global: table(&block.rope_global)?,
            inv_freq_local: table(&block.rope_local)?,
            block,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Layer `i`'s attention branch, without its residual:
    /// `post_attention_layernorm(o(attention(rope(q(n)), keys, values)))`,
    /// `n = input_layernorm(h)`, the new keys and values going through the cache.
    /// With [`Block::qk_norm`] queries and keys are (1 + w) RMS-normalised per head
    /// before RoPE. `h: [B, S, E]`, `cos, sin: [B, 1, S, D]` -> `[B, S, E]`.
    fn attention(
        &self,
        fw: &mut Forward,
        step: CachedStep,
        l: &Layer,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let i = step.layer;
        let (eps, ops) = (self.cfg.core.rms_norm_eps, fw.ops);
        let att = Attention::SelfAttn;
        let site_q = Site::new(i, att, TensorKind::Query);
        // [B, S, E]
        let a = rms_norm(h, &l.input_layernorm, eps, ops).at(site_q, "input_layernorm")?;
        // q [B, H, S, D], k and v [B, KVH, S, D]
        let Qkv { q, k, v, .. } = l.attn.qkv(&a, eps, (cos, sin), i, ops)?;
        // view.k, view.v: [B, KVH, K, D], the S new positions last; mask [B, 1, S, K]
        let (view, mask) = cached_keys(fw, step, &k, &v)?;
        let scale = (self.cfg.attn.query_pre_attn_scalar as f64).powf(-0.5);
        let cap = self.cfg.caps.attn_logit_softcapping;
        // [B, H, S, D]
        let o = softcapped_sdpa(
            &q,
            &view.k,
            &view.v,
            &Scores::new(&mask, scale, i, att, ops),
            cap,
        )?;
        // [B, S, E]
        merge_heads(&o)
            .and_then(|o| l.attn.o_proj.forward(&o))
            .and_then(|o| rms_norm(&o, &l.post_attention_layernorm, eps, ops))
            .at(site_q, "o_proj + post_attention_layernorm")
    }

    /// Layer `l`'s MLP branch, without its residual:
    /// `post_ff(down(act(gate(n)) * up(n)))`, `n = pre_ff(h)`, the norms in mode `ops`.
    /// `h: [B, S, E]` -> `[B, S, E]`.
    fn mlp(&self, l: &Layer, h: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
        let eps = self.cfg.core.rms_norm_eps;
        let n = rms_norm(h, &l.pre_feedforward_layernorm, eps, ops)?;
        let m = l
            .mlp
            .gelu(&n, Gelu::named(&self.cfg.core.hidden_activation))?;
        rms_norm(&m, &l.post_feedforward_layernorm, eps, ops)
    }
}

impl Model for Gemma2 {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (s, past) = fw.span(ids)?;
        let eps = self.cfg.core.rms_norm_eps;
        // [B][S]: each row's positions (real tokens from P on), read from the mask once.
        let positions = row_positions(fw.mask, past, s)?;
        let tables = |inv: &Tensor| rope_tables_at(inv, &positions, self.embed_tokens.dtype());
        // [B, 1, S, D] each: the global layers' and the sliding layers' tables
        let global = tables(&self.inv_freq_global)?;
        let local = if self.block.rope_local == self.block.rope_global {
            global.clone()
        } else {
            tables(&self.inv_freq_local)?
        };
        // [B, S, E], scaled by sqrt(E) as the embedding's dtype.
        let normalizer = (self.cfg.core.sizes.hidden_size as f64).sqrt() as f32;
        let mut h = embed(&self.embed_tokens, ids)
            .and_then(|x| x * f64::from(normalizer))
            .ctx("embed_tokens")?;
        for (i, l) in self.layers.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            let (cos, sin) = if self.block.sliding[i] {
                &local
            } else {
                &global
            };
            // Keys visible to a query: the cache's window, else this layer's own.
            let step = CachedStep::new(fw, i, past, self.block.windows[i]);
            let a = self.attention(fw, step, l, &h, (cos, sin))?;
            h = (h + a).at(site, "residual")?;
            let m = self.mlp(l, &h, fw.ops).at(site, "mlp")?;
            h = (h + m).at(site, "residual")?;
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        rms_norm(&fw.kept_positions(&h)?, &self.norm, eps, fw.ops)
            .and_then(|h| self.lm_head.forward(&h))
            .and_then(|x| soft_cap(&x, self.cfg.caps.final_logit_softcapping))
            .ctx("lm head")
    }
}
