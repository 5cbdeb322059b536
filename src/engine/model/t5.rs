//! T5: encoder-decoder, RMS-style `T5LayerNorm`, no `1/sqrt(d)` score scaling,
//! relative position buckets (computed by block 0 of each stack, shared by all its
//! blocks), decoder self-attention plus cross-attention over the encoder output.
//! Parameter names follow `T5ForConditionalGeneration`.
//!
//! Cache geometry: decoder self-attention `[B, num_heads, S, d_kv]`, cross-attention
//! `[B, num_heads, P + E, d_kv]`. `d_kv` is independent of `d_model / num_heads`
//! (t5-3b: 1024 / 32 = 32 but `d_kv` = 128), which is why the prefix must take its
//! head dimension from the config.
//!
//! Positions with a prefix: the P virtual tokens occupy positions `0..P` of the decoder
//! self-attention, so real decoder tokens start at `P` and the relative bias is computed
//! from absolute positions (key position - query position), as transformers does with
//! `cache_position`. The cross-attention has no position bias.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer, Serialize};

use super::attention::{
    additive_mask, cached_self_attention, merge_heads, sdpa, split_heads, CachedStep, MaskSpec,
    Scores,
};
use super::nn::{embed, gelu_tanh, rms_norm, Linear, Ops};
use super::weights::{ones, weight};
use super::{Encoded, Facts, Family, Forward, Model, ModelGeometry};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, EngineError, Result, Site, TensorKind,
};
use crate::engine::prefix::extend_mask;

/// `T5Config` (Hugging Face field names; unknown fields are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Per-head dimension of queries, keys and values (not `d_model / num_heads`).
    pub d_kv: usize,
    pub d_ff: usize,
    /// Encoder layers (and decoder layers unless `num_decoder_layers` is set).
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gelu`, `silu`, `gelu_new`, or the gated variants `gated-gelu`
    /// (`gelu_new`, as transformers maps it), `gated-silu`, `gated-relu`.
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// transformers >= 5: whether the decoder output is scaled by d_model^-0.5 before a
    /// tied LM head (older configs say it through `tie_word_embeddings`: T5 v1.1 is
    /// untied and unscaled). Default: `tie_word_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default, deserialize_with = "start_id")]
    pub decoder_start_token_id: u32,
    #[serde(default, deserialize_with = "pad_id")]
    pub pad_token_id: u32,
    #[serde(default = "default_eos", deserialize_with = "eos_id")]
    pub eos_token_id: u32,
}

fn default_buckets() -> usize {
    32
}

fn default_max_distance() -> usize {
    128
}

fn default_eps() -> f64 {
    1e-6
}

fn default_ff_proj() -> String {
    "relu".to_string()
}

fn default_true() -> bool {
    true
}

fn default_eos() -> u32 {
    1
}

/// A token id given as a number, a list of numbers (the first is taken) or `null`
/// (the default).
fn token_id<'de, D: Deserializer<'de>>(d: D, default: u32) -> std::result::Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<Id>::deserialize(d)? {
        Some(Id::One(i)) => i,
        Some(Id::Many(v)) => v.first().copied().unwrap_or(default),
        None => default,
    })
}

fn start_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    token_id(d, 0)
}

fn pad_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    token_id(d, 0)
}

fn eos_id<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    token_id(d, 1)
}

/// The feed-forward activation named by `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfActivation {
    Relu,
    /// Exact (erf) GELU, PyTorch `nn.GELU()` (`feed_forward_proj: gelu`).
    Gelu,
    /// Tanh approximation (`gelu_new`; what `gated-gelu` means in transformers).
    GeluNew,
    Silu,
}

impl FfActivation {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FfActivation::Relu => x.relu(),
            FfActivation::Gelu => x.gelu_erf(),
            FfActivation::GeluNew => gelu_tanh(x),
            FfActivation::Silu => x.silu(),
        }
    }
}

impl Config {
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/t5.json"))
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.decoder_layers(),
            num_attention_heads: self.num_heads,
            num_kv_heads: self.num_heads,
            head_dim: self.d_kv,
            hidden_size: self.d_model,
            vocab_size: self.vocab_size,
            max_positions: None,
            encoder_decoder: true,
        }
    }

    /// `(gated, activation)` as transformers' `T5Config.__init__` derives them from
    /// `feed_forward_proj`.
    pub fn feed_forward(&self) -> Result<(bool, FfActivation)> {
        let proj = self.feed_forward_proj.as_str();
        let parts: Vec<&str> = proj.split('-').collect();
        let (gated, name) = match parts.as_slice() {
            [name] => (false, *name),
            ["gated", name] => (true, *name),
            _ => {
                return Err(EngineError::Config(format!(
                    "t5: feed_forward_proj `{proj}` is not `ACT` or `gated-ACT`"
                )))
            }
        };
        let act = match (gated, name) {
            // transformers: "gated-gelu" means gelu_new, for backwards compatibility.
            (true, "gelu") | (_, "gelu_new") => FfActivation::GeluNew,
            (false, "gelu") => FfActivation::Gelu,
            (_, "relu") => FfActivation::Relu,
            (_, "silu") | (_, "swish") => FfActivation::Silu,
            _ => {
                return Err(EngineError::Config(format!(
                    "t5: unsupported feed_forward_proj `{proj}` (supported: relu, gelu, gelu_new, silu, gated-gelu, gated-relu, gated-silu)"
                )))
            }
        };
        Ok((gated, act))
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`key_position - query_position`), with its float32 arithmetic and truncation.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let rel = if bidirectional {
        nb /= 2;
        if relative_position > 0 {
            bucket += nb;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = nb / 2;
    if rel < max_exact {
        return (bucket + rel) as usize;
    }
    let ratio = (rel as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (nb - max_exact) as f32;
    let large = (max_exact + ratio as i64).min(nb - 1);
    (bucket + large) as usize
}

/// Relative position bias `[1, H, S, K]` from `table: [buckets, H]` for queries at
/// `q_start..q_start+S` and keys at `kv_start..kv_start+K` (absolute positions).
fn position_bias(
    table: &Tensor,
    cfg: &Config,
    (q_start, q_len): (usize, usize),
    (kv_start, kv_len): (usize, usize),
    bidirectional: bool,
) -> candle_core::Result<Tensor> {
    let heads = table.dim(1)?;
    let mut buckets = Vec::with_capacity(q_len * kv_len);
    for qi in 0..q_len {
        for ki in 0..kv_len {
            let rel = (kv_start + ki) as i64 - (q_start + qi) as i64;
            buckets.push(relative_position_bucket(
                rel,
                bidirectional,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            ) as u32);
        }
    }
    // [S*K]
    let ids = Tensor::from_vec(buckets, q_len * kv_len, table.device())?;
    // [S*K, H] -> [S, K, H] -> [1, H, S, K]
    table
        .index_select(&ids, 0)?
        .reshape((q_len, kv_len, heads))?
        .permute((2, 0, 1))?
        .unsqueeze(0)
}

/// One `T5Attention` (no biases): `q, k, v`: `Linear` `[d_model, H*d_kv]`,
/// `o`: `Linear` `[H*d_kv, d_model]`.
struct Attn {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

/// `T5DenseActDense` (`wi`) or `T5DenseGatedActDense` (`wi_0`, `wi_1`), no biases.
struct FeedForward {
    /// `Linear` `[d_model, d_ff]`: `wi`, or `wi_0` when gated.
    wi: Linear,
    /// `Linear` `[d_model, d_ff]`: `wi_1` when gated.
    wi_1: Option<Linear>,
    /// `Linear` `[d_ff, d_model]`
    wo: Linear,
}

/// One `T5Block` (`{stack}.block.{i}.layer`): self-attention at `layer.0`, in the
/// decoder cross-attention at `layer.1`, then the feed-forward (`layer.1` in the
/// encoder, `layer.2` in the decoder).
struct Block {
    /// `[d_model]` each
    ln_self: Tensor,
    self_attn: Attn,
    /// Decoder blocks: `layer.1`'s norm `[d_model]` and `EncDecAttention`.
    cross: Option<(Tensor, Attn)>,
    ln_ff: Tensor,
    ff: FeedForward,
}

/// One stack of blocks (`encoder` or `decoder`) with what it shares: block 0's
/// `relative_attention_bias` and the final norm.
struct Stack {
    blocks: Vec<Block>,
    /// Block 0's `relative_attention_bias` `[buckets, H]`.
    bias: Tensor,
    /// `final_layer_norm` `[d_model]`.
    ln: Tensor,
}

pub struct T5 {
    /// What the model reports about itself (`Model::facts`).
    facts: Facts,
    cfg: Config,
    act: FfActivation,
    /// `[V, d_model]`, the token embeddings of both stacks.
    shared: Tensor,
    encoder: Stack,
    decoder: Stack,
    /// `Linear` `[d_model, V]`: `shared` transposed when `tie_word_embeddings`,
    /// `lm_head.weight` transposed otherwise.
    lm_head: Linear,
}

/// The bias-free `nn.Linear` `{p}.{n}.weight` of `shape` `[out, in]` as a `Linear`
/// `[in, out]`.
fn lin(vb: &VarBuilder, p: &str, n: &str, shape: (usize, usize)) -> Result<Linear> {
    let name = format!("{p}.{n}.weight");
    let w = weight(vb, shape, &name).ctx(&name)?;
    Linear::from_torch(&w, None).ctx(&name)
}

fn attn(vb: &VarBuilder, p: &str, cfg: &Config) -> Result<Attn> {
    let (e, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
    let w = |n: &str, shape: (usize, usize)| lin(vb, p, n, shape);
    Ok(Attn {
        q: w("q", (inner, e))?,
        k: w("k", (inner, e))?,
        v: w("v", (inner, e))?,
        o: w("o", (e, inner))?,
    })
}

fn feed_forward(vb: &VarBuilder, p: &str, cfg: &Config, gated: bool) -> Result<FeedForward> {
    let (e, f) = (cfg.d_model, cfg.d_ff);
    let w = |n: &str, shape: (usize, usize)| lin(vb, p, n, shape);
    Ok(if gated {
        FeedForward {
            wi: w("wi_0", (f, e))?,
            wi_1: Some(w("wi_1", (f, e))?),
            wo: w("wo", (e, f))?,
        }
    } else {
        FeedForward {
            wi: w("wi", (f, e))?,
            wi_1: None,
            wo: w("wo", (e, f))?,
        }
    })
}

fn norm(vb: &VarBuilder, name: &str, e: usize) -> Result<Tensor> {
    let name = format!("{name}.weight");
    ones(vb, e, &name).ctx(&name)
}

impl Stack {
    /// Stack `name`: `encoder` (`num_layers` blocks) or `decoder`
    /// (`num_decoder_layers` blocks, with cross-attention); `gated`: the
    /// feed-forward of [`Config::feed_forward`].
    fn load(vb: &VarBuilder, name: &str, cfg: &Config, gated: bool) -> Result<Self> {
        let e = cfg.d_model;
        let decoder = name == "decoder";
        let layers = if decoder {
            cfg.decoder_layers()
        } else {
            cfg.num_layers
        };
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let p = format!("{name}.block.{i}.layer");
            let ln_self = norm(vb, &format!("{p}.0.layer_norm"), e)?;
            let self_attn = attn(vb, &format!("{p}.0.SelfAttention"), cfg)?;
            let cross = if decoder {
                Some((
                    norm(vb, &format!("{p}.1.layer_norm"), e)?,
                    attn(vb, &format!("{p}.1.EncDecAttention"), cfg)?,
                ))
            } else {
                None
            };
            let f = if decoder { 2 } else { 1 };
            blocks.push(Block {
                ln_self,
                self_attn,
                cross,
                ln_ff: norm(vb, &format!("{p}.{f}.layer_norm"), e)?,
                ff: feed_forward(vb, &format!("{p}.{f}.DenseReluDense"), cfg, gated)?,
            });
        }
        let bias_name =
            format!("{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
        let shape = (cfg.relative_attention_num_buckets, cfg.num_heads);
        Ok(Self {
            blocks,
            bias: weight(vb, shape, &bias_name).ctx(&bias_name)?,
            ln: norm(vb, &format!("{name}.final_layer_norm"), e)?,
        })
    }
}

impl T5 {
    pub fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        if cfg.relative_attention_num_buckets < 4 {
            return Err(EngineError::Config(format!(
                "t5: relative_attention_num_buckets must be at least 4, got {}",
                cfg.relative_attention_num_buckets
            )));
        }
        if cfg.d_kv == 0 || cfg.num_heads == 0 || cfg.d_model == 0 {
            return Err(EngineError::Config(
                "t5: d_model, d_kv and num_heads must be at least 1".into(),
            ));
        }
        let e = cfg.d_model;
        // `shared.weight`; checkpoints saved without the tied alias keep the encoder's.
        let shared_name = if !vb.contains_tensor("shared.weight")
            && vb.contains_tensor("encoder.embed_tokens.weight")
        {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let shared = weight(&vb, (cfg.vocab_size, e), shared_name).ctx(shared_name)?;
        let encoder = Stack::load(&vb, "encoder", cfg, gated)?;
        let decoder = Stack::load(&vb, "decoder", cfg, gated)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_torch(&shared, None).ctx(shared_name)?
        } else {
            let w = weight(&vb, (cfg.vocab_size, e), "lm_head.weight").ctx("lm_head.weight")?;
            Linear::from_torch(&w, None).ctx("lm_head.weight")?
        };
        Ok(Self {
            facts: Facts::global(Family::T5, cfg.geometry()),
            cfg: cfg.clone(),
            act,
            shared,
            encoder,
            decoder,
            lm_head,
        })
    }

    /// `x: [B, S, d_model]` -> `[B, S, d_model]`
    fn feed_forward(&self, ff: &FeedForward, x: &Tensor) -> candle_core::Result<Tensor> {
        // [B, S, d_ff]
        let hidden = self.act.apply(&ff.wi.forward(x)?)?;
        let hidden = match &ff.wi_1 {
            Some(wi_1) => (hidden * wi_1.forward(x)?)?,
            None => hidden,
        };
        ff.wo.forward(&hidden)
    }

    /// Queries (or keys, values) of `x: [B, S, d_model]` -> `[B, H, S, d_kv]`.
    fn heads(&self, x: &Tensor, w: &Linear) -> candle_core::Result<Tensor> {
        split_heads(&w.forward(x)?, self.cfg.num_heads, self.cfg.d_kv)
    }

    /// `blk`'s self-attention inputs: `h: [B, S, d_model]` -> queries, keys and values
    /// of `layer_norm(h)`, `[B, H, S, d_kv]` each. Errors name the tensors with `stack`
    /// in front (`"encoder "`; `""` in the decoder).
    fn self_qkv(
        &self,
        blk: &Block,
        h: &Tensor,
        site: Site,
        stack: &str,
        ops: Ops,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let eps = self.cfg.layer_norm_epsilon;
        let a = rms_norm(h, &blk.ln_self, eps, ops).at(site, &format!("{stack}layer_norm"))?;
        let heads = |w: &Linear, n: &str| self.heads(&a, w).at(site, &format!("{stack}{n}"));
        let attn = &blk.self_attn;
        Ok((
            heads(&attn.q, "q")?,
            heads(&attn.k, "k")?,
            heads(&attn.v, "v")?,
        ))
    }

    /// Attention output `[B, H, S, d_kv]` through `o` -> `[B, S, d_model]`.
    fn output(&self, o: &Tensor, w: &Linear) -> candle_core::Result<Tensor> {
        w.forward(&merge_heads(o)?)
    }
}

impl Model for T5 {
    fn facts(&self) -> &Facts {
        &self.facts
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.cfg.decoder_start_token_id
    }

    /// `ids: [B, E]`, `mask: [B, E]` (1 = token) -> states `[B, E, d_model]`.
    /// No prefix and no cache: PEFT's prefix feeds the decoder's caches only.
    fn encode(&self, ids: &Tensor, mask: &Tensor, ops: Ops) -> Result<Encoded> {
        let (_b, e_len) = ids.dims2().ctx("encoder input ids [B, E]")?;
        let eps = self.cfg.layer_norm_epsilon;
        // [B, E]
        let mask = mask.to_dtype(DType::F32).ctx("encoder padding mask")?;
        // [1, H, E, E]
        let bias = position_bias(&self.encoder.bias, &self.cfg, (0, e_len), (0, e_len), true)
            .ctx("encoder relative position bias")?;
        // [B, E, d_model]
        let mut h = embed(&self.shared, ids).ctx("encoder embeddings")?;
        for (i, blk) in self.encoder.blocks.iter().enumerate() {
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            // [B, H, E, d_kv] each
            let (q, k, v) = self.self_qkv(blk, &h, site, "encoder ", ops)?;
            let spec = MaskSpec {
                q_start: 0,
                q_len: e_len,
                kv_start: 0,
                kv_len: e_len,
                causal: false,
                window: None,
            };
            // [B, 1, E, E]
            let m = additive_mask(&mask, spec, i, Attention::SelfAttn)?;
            let o = sdpa(
                &q,
                &k,
                &v,
                &Scores::new(&m, 1.0, i, Attention::SelfAttn, ops).with_bias(Some(&bias)),
            )?;
            let o = self.output(&o, &blk.self_attn.o).at(site, "encoder o")?;
            h = (h + o).at(site, "encoder residual")?;
            let f = rms_norm(&h, &blk.ln_ff, eps, ops)
                .and_then(|f| self.feed_forward(&blk.ff, &f))
                .at(site, "encoder feed-forward")?;
            h = (h + f).at(site, "encoder residual")?;
        }
        let states = rms_norm(&h, &self.encoder.ln, eps, ops).ctx("encoder final_layer_norm")?;
        Ok(Encoded { states, mask })
    }

    /// Decoder ids `[B, S]` -> logits `[B, S, V]`; reads `fw.encoder` (states
    /// `[B, E, d_model]`, mask `[B, E]`).
    fn forward(&self, ids: &Tensor, fw: &mut Forward) -> Result<Tensor> {
        let (b, s) = ids.dims2().ctx("decoder input ids [B, S]")?;
        let enc = fw.encoder.ok_or_else(|| {
            EngineError::Config(
                "t5: the decoder needs the encoder output (call encode first)".into(),
            )
        })?;
        let e_len = enc.states.dim(1).ctx("encoder states [B, E, d_model]")?;
        let past = fw.cache.past_len();
        let (heads, d) = (self.cfg.num_heads, self.cfg.d_kv);
        let (eps, ops) = (self.cfg.layer_norm_epsilon, fw.ops);
        // Block 0's bias, shared by every block; keyed by the key span it was built for.
        let mut self_bias: Option<((usize, usize), Tensor)> = None;
        // [B, S, d_model]
        let mut h = embed(&self.shared, ids).ctx("decoder embeddings")?;
        for (i, blk) in self.decoder.blocks.iter().enumerate() {
            let (ln_cross, cross_attn) = blk.cross.as_ref().ok_or_else(|| {
                EngineError::Config(format!("t5: decoder block {i} has no cross-attention"))
            })?;
            // Self-attention over prefix + cached + new positions.
            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            // [B, H, S, d_kv] each
            let (q, k, v) = self.self_qkv(blk, &h, site, "", ops)?;
            // [B, H, S, d_kv]; relative position bias [1, H, S, K] over the keys the cache
            // returns (computed once per pass, shared by every layer), no score scaling.
            let step = CachedStep::new(fw, i, past, None);
            let o = cached_self_attention(fw, step, &q, &k, &v, 1.0, &mut |kv_start, kv_len| {
                let span = (kv_start, kv_len);
                if let Some((key, t)) = &self_bias {
                    if *key == span {
                        return Ok(Some(t.clone()));
                    }
                }
                let t = position_bias(&self.decoder.bias, &self.cfg, (past, s), span, false).at(
                    Site::new(i, Attention::SelfAttn, TensorKind::Positions),
                    "relative position bias",
                )?;
                self_bias = Some((span, t.clone()));
                Ok(Some(t))
            })?;
            let o = self.output(&o, &blk.self_attn.o).at(site, "o")?;
            h = (h + o).at(site, "residual")?;

            // Cross-attention over cross prefix + encoder states.
            let site = Site::new(i, Attention::Cross, TensorKind::Query);
            let c = rms_norm(&h, ln_cross, eps, ops).at(site, "layer_norm")?;
            // [B, H, S, d_kv]
            let q = self.heads(&c, &cross_attn.q).at(site, "q")?;
            let p_cross = fw.cache.cross_prefix_len(i);
            // [B, H, P + E, d_kv] each
            let (ck, cv) = fw.cache.cross(i, || {
                // [B, H, E, d_kv] each
                let k = self
                    .heads(&enc.states, &cross_attn.k)
                    .at(Site::new(i, Attention::Cross, TensorKind::Key), "cross k")?;
                let v = self
                    .heads(&enc.states, &cross_attn.v)
                    .at(Site::new(i, Attention::Cross, TensorKind::Value), "cross v")?;
                Ok((k, v))
            })?;
            // A key tensor of the wrong rank is diagnosed by `sdpa`.
            let kdims = ck.dims().to_vec();
            if let Some(&k_len) = kdims.get(2).filter(|_| kdims.len() == 4) {
                if k_len != p_cross + e_len {
                    return Err(Diagnosis::new(
                        DiagnosisClass::SeqLen,
                        format!(
                            "cross-attention keys hold {k_len} positions but the cross prefix ({p_cross}) + encoder states ({e_len}) are {}: the cross cache was marked already computed before the encoder keys were added",
                            p_cross + e_len
                        ),
                    )
                    .at(i, Attention::Cross, TensorKind::Key)
                    .shapes(&[b, heads, p_cross + e_len, d], &kdims)
                    .hint("transformers before PR 34312 marked the cross-attention cache as updated when the prefix was injected, so encoder keys were never added")
                    .into());
                }
            }
            // [B, P + E]
            let cross_pad = if p_cross > 0 {
                extend_mask(&enc.mask, p_cross)?
            } else {
                enc.mask.clone()
            };
            let spec = MaskSpec {
                q_start: past,
                q_len: s,
                kv_start: 0,
                kv_len: p_cross + e_len,
                causal: false,
                window: None,
            };
            // [B, 1, S, P + E]
            let mask = additive_mask(&cross_pad, spec, i, Attention::Cross)?;
            fw.cache.note_mask(i, Attention::Cross, mask.dims());
            let o = sdpa(
                &q,
                &ck,
                &cv,
                &Scores::new(&mask, 1.0, i, Attention::Cross, ops),
            )?;
            let o = self.output(&o, &cross_attn.o).at(site, "o")?;
            h = (h + o).at(site, "residual")?;

            let site = Site::new(i, Attention::SelfAttn, TensorKind::Query);
            let f = rms_norm(&h, &blk.ln_ff, eps, ops)
                .and_then(|f| self.feed_forward(&blk.ff, &f))
                .at(site, "feed-forward")?;
            h = (h + f).at(site, "residual")?;
        }
        // [B, S, d_model], or [B, 1, d_model] with fw.last_only
        let h = rms_norm(&fw.kept_positions(&h)?, &self.decoder.ln, eps, ops)
            .ctx("decoder final_layer_norm")?;
        // [B, S or 1, V]
        let scale = self
            .cfg
            .scale_decoder_outputs
            .unwrap_or(self.cfg.tie_word_embeddings);
        let h = if scale {
            (h * (self.cfg.d_model as f64).powf(-0.5))
                .ctx("scale decoder output by d_model^-0.5")?
        } else {
            h
        };
        let logits = self.lm_head.forward(&h);
        if self.cfg.tie_word_embeddings {
            logits.ctx("lm head (tied)")
        } else {
            logits.ctx("lm head")
        }
    }
}
