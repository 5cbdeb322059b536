//! GPT-NeoX (Pythia): fused `query_key_value` with per-head interleaved rows (`[H, 3,
//! D]` along the output dimension: q, k, v of head 0, then head 1, ...), partial
//! rotary positions (RoPE, NeoX `rotate_half`, on the first `rotary_pct * head_dim`
//! dimensions of each head; the rest pass through), LayerNorm with bias, a GELU MLP,
//! parallel (`x + attn(ln1(x)) + mlp(ln2(x))`) or sequential residuals
//! (`use_parallel_residual`), and an untied `embed_out`. Parameter names follow
//! `GPTNeoXForCausalLM`.
//!
//! Cache geometry: `[B, num_attention_heads, S, hidden_size / num_attention_heads]`.
//! The P virtual tokens occupy positions `0..P`; prefix keys enter the cache without
//! RoPE (as PEFT's prefix does in transformers).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::attention::{cached_self_attention, CachedStep};
use super::llama::RopeParameters;
use super::mlp::GeluMlp;
use super::nn::{
    default_inv_freq, embed, inv_freq_tensor, pass_rope_tables, rope, FusedAttention, LayerNorm,
    Linear, Ops,
};
use super::weights::{linear, lm_head, weight};
use super::{backbone, Facts, Family, Forward, Gelu, Model, ModelGeometry, Sizes};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result, Site, TensorKind};

/// `GPTNeoXConfig` (Hugging Face field names and defaults; transformers 4.x spelling
/// `rotary_pct` / `rotary_emb_base`, which transformers 5 still reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub sizes: Sizes,
    /// `gelu` (erf), or the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`,
    /// `gelu_fast`).
    pub hidden_act: String,
    /// Fraction of each head's dimensions that RoPE rotates.
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    /// transformers >= 5: `{"rope_theta", "partial_rotary_factor", "rope_type"}`
    /// (replaces `rotary_emb_base` / `rotary_pct` when present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    /// Biases on `query_key_value` and `dense`.
    pub attention_bias: bool,
}

impl Config {
    /// Hidden 64, 2 layers, 4 heads (head_dim 16, RoPE on the first 4 dimensions of
    /// each head: `rotary_pct` 0.25), intermediate 160 (not 4 x 64), vocabulary 256,
    /// parallel residuals, attention biases, untied `embed_out`.
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/gpt_neox.json"))
    }

    pub fn head_dim(&self) -> usize {
        self.sizes.hidden_size / self.sizes.num_attention_heads.max(1)
    }

    /// Rotated dimensions per head: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_ndims(&self) -> usize {
        let pct = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.partial_rotary_factor)
            .unwrap_or(self.rotary_pct);
        (self.head_dim() as f64 * pct) as usize
    }

    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .unwrap_or(self.rotary_emb_base)
    }

    pub fn geometry(&self) -> ModelGeometry {
        self.sizes
            .rope_geometry(self.sizes.num_attention_heads, self.head_dim())
    }

    /// What `ModelConfig::validate`'s geometry checks cannot see.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(format!("gpt_neox: {m}")));
        let r = self.rotary_ndims();
        if !r.is_multiple_of(2) || r > self.head_dim() {
            return bad(format!(
                "{r} rotary dimensions (head_dim {} x rotary_pct) must be even and at most head_dim",
                self.head_dim()
            ));
        }
        if let Some(t) = self.rope_parameters.as_ref().map(RopeParameters::kind) {
            if t != "default" {
                return bad(format!("rope_type `{t}` is not supported (only default)"));
            }
        }
        if !Gelu::NAMES.contains(&self.hidden_act.as_str()) {
            return bad(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast)",
                self.hidden_act
            ));
        }
        Ok(())
    }
}

struct Layer {
    /// `input_layernorm`, `attention.{query_key_value, dense}`, `post_attention_layernorm`
    attn: FusedAttention,
    /// `mlp.dense_h_to_4h` `[E, I]`, `mlp.dense_4h_to_h` `[I, E]`, the `hidden_act` GELU
    mlp: GeluMlp,
}

pub struct GptNeox {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    cfg: Config,
    /// `[V, E]`
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    /// `Linear` `[E, V]` (`embed_in` transposed when `tie_word_embeddings`)
    embed_out: Linear,
    /// RoPE inverse frequencies `[1, R/2]` (R = rotary dimensions), f32.
    inv_freq: Tensor,
}

impl GptNeox {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.check()?;
        let root = vb.clone();
        let vb = backbone(&vb, "gpt_neox", "embed_in.weight");
        let (e, inter, ab) = (
            cfg.sizes.hidden_size,
            cfg.sizes.intermediate_size,
            cfg.attention_bias,
        );
        let eps = cfg.layer_norm_eps;
        let embed_in = weight(&vb, (cfg.sizes.vocab_size, e), "embed_in.weight").ctx("embed_in")?;
        let mut layers = Vec::with_capacity(cfg.sizes.num_hidden_layers);
        for i in 0..cfg.sizes.num_hidden_layers {
            let p = format!("layers.{i}");
            layers.push(Layer {
                attn: FusedAttention::load(&vb, &p, "attention", e, eps, ab)?,
                mlp: GeluMlp {
                    up: linear(&vb, &format!("{p}.mlp.dense_h_to_4h"), e, inter, true)?,
                    down: linear(&vb, &format!("{p}.mlp.dense_4h_to_h"), inter, e, true)?,
                    gelu: Gelu::named(&cfg.hidden_act),
                },
            });
        }
        let final_layer_norm = LayerNorm::load(&vb, "final_layer_norm", e, eps)?;
        let tied = cfg.sizes.tie_word_embeddings;
        let embed_out = lm_head(&root, "embed_out", &embed_in, "embed_in", tied)?;
        let inv = default_inv_freq(cfg.theta(), cfg.rotary_ndims());
        let inv_freq = inv_freq_tensor(&inv, embed_in.device())?;
        Ok(Self {
            facts: Facts::global(Family::GptNeox, cfg.geometry()),
            cfg: cfg.clone(),
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            inv_freq,
        })
    }

    /// Layer `l`'s MLP branch, without its residual: `x: [B, S, E]` ->
    /// `dense_4h_to_h(act(dense_h_to_4h(n)))` `[B, S, E]`, `n = post_attention_layernorm(x)`
    /// in mode `ops`.
    fn mlp(&self, l: &Layer, x: &Tensor, ops: Ops) -> candle_core::Result<Tensor> {
        let n = l.attn.post_attention_layernorm.forward(x, ops)?;
        l.mlp.forward(&n)
    }
}

/// Partial RoPE: `x: [B, H, S, D]`, `cos, sin: [B, 1, S, R]` -> `[B, H, S, D]` with the
/// first R dimensions rotated (`rotate_half` over R) and the other D - R unchanged.
fn partial_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (d, r) = (x.dim(3)?, cos.dim(3)?);
    if r == 0 {
        return Ok(x.clone());
    }
    let rotated = rope(&x.narrow(3, 0, r)?.contiguous()?, cos, sin)?;
    if r == d {
        return Ok(rotated);
    }
    Tensor::cat(&[&rotated, &x.narrow(3, r, d - r)?], 3)
}

impl Model for GptNeox {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (s, past) = fw.span(ids)?;
        let (heads, d) = (self.cfg.sizes.num_attention_heads, self.cfg.head_dim());
        let ops = fw.ops;
        // [B, 1, S, R] each (real tokens from P on).
        let (cos, sin) = pass_rope_tables(fw, past, s, &self.inv_freq, self.embed_in.dtype())?;
        // [B, S, E]
        let mut h = embed(&self.embed_in, ids).ctx("embed_in")?;
        for (i, l) in self.layers.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            // q, k, v [B, H, S, D] each
            let (_, [q, k, v]) = l.attn.normed_qkv(&h, (heads, d), site, ops)?;
            let q = partial_rope(&q, &cos, &sin).at(site, "query + rope")?;
            let k = partial_rope(&k, &cos, &sin).at(
                Site::new(i, Attention::SelfAttn, TensorKind::Key),
                "key + rope",
            )?;
            let v = v.contiguous().at(
                Site::new(i, Attention::SelfAttn, TensorKind::Value),
                "value",
            )?;
            let scale = 1.0 / (d as f64).sqrt();
            // [B, H, S, D]
            let step = CachedStep::new(fw, i, past, None);
            let o = cached_self_attention(fw, step, &q, &k, &v, scale, &mut |_, _| Ok(None))?;
            // [B, S, E]
            let attn = l.attn.output(&o, site)?;
            h = if self.cfg.use_parallel_residual {
                // x + attn(ln1(x)) + mlp(ln2(x))
                let m = self.mlp(l, &h, ops).at(site, "mlp")?;
                (&h + attn).and_then(|x| x + m).at(site, "residual")?
            } else {
                // y = x + attn(ln1(x)); y + mlp(ln2(y))
                let y = (&h + attn).at(site, "residual")?;
                let m = self.mlp(l, &y, ops).at(site, "mlp")?;
                (y + m).at(site, "residual")?
            };
        }
        // [B, S, V], or [B, 1, V] with fw.last_only
        self.final_layer_norm
            .forward(&fw.kept_positions(&h)?, ops)
            .and_then(|h| self.embed_out.forward(&h))
            .ctx("embed_out")
    }
}
