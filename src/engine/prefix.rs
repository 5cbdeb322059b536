//! The prefix: PEFT's `PrefixEncoder` and `get_prompt` geometry, and the decision of
//! how the prefix is shaped before it enters the cache (its `layout`).
//!
//! Where the prefix shape is decided, in order:
//! 1. [`PeftGeometry::for_model`]: heads `H` (KV heads, or attention heads for the
//!    historical GQA bug), `head_dim` `D` (config, or hidden/heads for the historical
//!    bug), `token_dim = H * D`, number of layers `L`, submodules (2 for T5).
//! 2. [`PrefixEncoder::forward`]: `[P, L * 2 * token_dim]` (PEFT's `prompt_embeddings`).
//! 3. [`PrefixEncoder::past_key_values`]: view `[B, P, 2L, H, D]`, duplicated along the
//!    layer axis for encoder-decoders, permuted to `[2L, B, H, P, D]`, split per layer.
//! 4. [`shape_for_layout`]: standard 4-D, or a legacy layout.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::engine::cache::{Layout, ModelCache};
use crate::engine::diagnosis::{Attention, CandleExt, EngineError, Result};
use crate::engine::model::ModelGeometry;
use crate::engine::rng::Rng;

/// How the prefix is shaped before it is placed into the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixLayout {
    /// Ask the cache which layout it stores (the fixed behaviour).
    #[default]
    Auto,
    /// Always 4-D `[B, H, P, D]`.
    Standard,
    /// Bloom's 3-D legacy tuple (PEFT <= 0.12): keys `[B*H, D, P]`, values `[B*H, P, D]`.
    BloomLegacy,
    /// GPT-BigCode's fused legacy tensor (PEFT before PR 2662): `[B, P, 2*D]`, head 0.
    BigcodeFused,
}

impl PrefixLayout {
    /// The concrete cache layout this setting produces for a cache storing `cache`.
    pub fn resolve(&self, cache: Layout) -> Layout {
        match self {
            PrefixLayout::Auto => cache,
            PrefixLayout::Standard => Layout::Standard,
            PrefixLayout::BloomLegacy => Layout::BloomLegacy,
            PrefixLayout::BigcodeFused => Layout::BigcodeFused,
        }
    }
}

/// Which head count the prefix is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadsFrom {
    /// `num_key_value_heads` (PEFT >= 0.12, PR 1901): correct for GQA/MQA.
    #[default]
    KvHeads,
    /// `num_attention_heads` (PEFT < 0.12): wrong for GQA/MQA models.
    AttentionHeads,
}

/// Where the prefix takes its per-head dimension from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadDimFrom {
    /// The config's `head_dim` / `d_kv` when given (the fix).
    #[default]
    Config,
    /// `hidden_size / num_attention_heads` (PEFT < 0.18 on Qwen3; T5-3B).
    HiddenOverHeads,
}

/// The element type the prefix enters the cache with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixDtype {
    /// The model's dtype (the fix).
    #[default]
    Model,
    F16,
    Bf16,
    F64,
}

impl PrefixDtype {
    pub fn dtype(&self) -> Option<DType> {
        match self {
            PrefixDtype::Model => None,
            PrefixDtype::F16 => Some(DType::F16),
            PrefixDtype::Bf16 => Some(DType::BF16),
            PrefixDtype::F64 => Some(DType::F64),
        }
    }
}

/// Initial values of the prefix parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixInit {
    /// Seeded values with unit spread (PyTorch's `nn.Embedding` default is N(0, 1)).
    #[default]
    Random,
    Zero,
}

/// Settings of a prefix (PEFT's `PrefixTuningConfig` plus the historical switches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixConfig {
    /// P, the number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Embedding + Linear + Tanh + Linear (PEFT `prefix_projection`).
    pub projection: bool,
    /// Hidden size of the projection MLP (PEFT `encoder_hidden_size`).
    pub encoder_hidden_size: usize,
    pub init: PrefixInit,
    pub layout: PrefixLayout,
    pub heads_from: HeadsFrom,
    pub head_dim_from: HeadDimFrom,
    /// Historical switch: cast the prefix to another dtype than the model's (PEFT PR 520).
    #[serde(default)]
    pub dtype: PrefixDtype,
    /// Encoder-decoders: whether the cross-attention part reaches the cross cache.
    #[serde(default)]
    pub cross: CrossPrefix,
    pub seed: u64,
}

/// What happens to the cross-attention part of an encoder-decoder prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrossPrefix {
    /// Placed in front of the encoder's keys and values (what PEFT's `get_prompt`
    /// builds; PEFT 0.12 with transformers 4.46 passes it on).
    #[default]
    Inject,
    /// Dropped: the cross cache holds the encoder's keys and values only (PEFT 0.21.2
    /// with transformers 5.24 replaces the cross cache with an empty one; the cross
    /// blocks of `prompt_embeddings` are then never used nor trained).
    Drop,
}

impl PrefixConfig {
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            num_virtual_tokens,
            projection: false,
            encoder_hidden_size: 32,
            init: PrefixInit::Random,
            layout: PrefixLayout::Auto,
            heads_from: HeadsFrom::KvHeads,
            head_dim_from: HeadDimFrom::Config,
            dtype: PrefixDtype::Model,
            cross: CrossPrefix::Inject,
            seed: 0,
        }
    }
}

/// The numbers PEFT writes into `adapter_config.json` and uses in `get_prompt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeftGeometry {
    pub num_virtual_tokens: usize,
    pub num_layers: usize,
    /// Heads of the prefix (PEFT's `num_attention_heads`: the KV heads since PR 1901).
    pub num_attention_heads: usize,
    /// `num_attention_heads * head_dim`.
    pub token_dim: usize,
    /// 1 for decoder-only models, 2 for encoder-decoders (self + cross).
    pub num_transformer_submodules: usize,
}

impl PeftGeometry {
    pub fn for_model(model: &ModelGeometry, cfg: &PrefixConfig) -> Result<Self> {
        let heads = match cfg.heads_from {
            HeadsFrom::KvHeads => model.num_kv_heads,
            HeadsFrom::AttentionHeads => model.num_attention_heads,
        };
        let head_dim = match cfg.head_dim_from {
            HeadDimFrom::Config => model.head_dim,
            HeadDimFrom::HiddenOverHeads => model.hidden_size / model.num_attention_heads.max(1),
        };
        if cfg.num_virtual_tokens == 0 {
            return Err(EngineError::Config(
                "prefix.num_virtual_tokens must be at least 1".into(),
            ));
        }
        Ok(Self {
            num_virtual_tokens: cfg.num_virtual_tokens,
            num_layers: model.num_layers,
            num_attention_heads: heads,
            token_dim: heads * head_dim,
            num_transformer_submodules: if model.encoder_decoder { 2 } else { 1 },
        })
    }

    pub fn head_dim(&self) -> usize {
        self.token_dim / self.num_attention_heads.max(1)
    }

    /// Width of one row of `prompt_embeddings`: `L * 2 * token_dim`.
    pub fn embedding_width(&self) -> usize {
        self.num_layers * 2 * self.token_dim
    }
}

/// One layer's prefix in the standard layout.
#[derive(Debug, Clone)]
pub struct LayerPrefix {
    /// `[B, H, P, D]`
    pub key: Tensor,
    /// `[B, H, P, D]`
    pub value: Tensor,
    /// Encoder-decoders only: cross-attention `([B, H, P, D], [B, H, P, D])`.
    pub cross: Option<(Tensor, Tensor)>,
}

/// PEFT's `PrefixEncoder`: trainable parameters that produce `prompt_embeddings`.
#[derive(Debug, Clone)]
pub struct PrefixEncoder {
    pub config: PrefixConfig,
    pub geometry: PeftGeometry,
    /// `[P, L*2*token_dim]` (flat) or `[P, token_dim]` (projection).
    pub embedding: Var,
    /// Projection MLP `(w1 [hidden, token_dim], b1 [hidden], w2 [L*2*token_dim, hidden],
    /// b2 [L*2*token_dim])`, PEFT's `transform.0` and `transform.2`.
    pub transform: Option<(Var, Var, Var, Var)>,
}

fn seeded_var(
    seed: u64,
    name: &str,
    dims: &[usize],
    std: f64,
    zero: bool,
    dev: &Device,
) -> Result<Var> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = if zero {
        vec![0.0; n]
    } else {
        let mut rng = Rng::for_name(seed, name);
        (0..n).map(|_| rng.scaled(0.0, std) as f32).collect()
    };
    let t = Tensor::from_vec(data, dims, dev).ctx("create prefix parameter")?;
    Var::from_tensor(&t).ctx("create prefix parameter")
}

impl PrefixEncoder {
    pub fn new(config: &PrefixConfig, model: &ModelGeometry, device: &Device) -> Result<Self> {
        let g = PeftGeometry::for_model(model, config)?;
        let p = g.num_virtual_tokens;
        let zero = config.init == PrefixInit::Zero;
        let seed = config.seed;
        let (embedding, transform) = if config.projection {
            let h = config.encoder_hidden_size;
            let w = g.embedding_width();
            let emb = seeded_var(
                seed,
                "embedding.weight",
                &[p, g.token_dim],
                1.0,
                zero,
                device,
            )?;
            // Linear layers as PyTorch initialises them: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            let s1 = 1.0 / (3.0 * g.token_dim as f64).sqrt();
            let s2 = 1.0 / (3.0 * h as f64).sqrt();
            let w1 = seeded_var(
                seed,
                "transform.0.weight",
                &[h, g.token_dim],
                s1,
                false,
                device,
            )?;
            let b1 = seeded_var(seed, "transform.0.bias", &[h], s1, false, device)?;
            let w2 = seeded_var(seed, "transform.2.weight", &[w, h], s2, false, device)?;
            let b2 = seeded_var(seed, "transform.2.bias", &[w], s2, false, device)?;
            (emb, Some((w1, b1, w2, b2)))
        } else {
            let emb = seeded_var(
                seed,
                "embedding.weight",
                &[p, g.embedding_width()],
                1.0,
                zero,
                device,
            )?;
            (emb, None)
        };
        Ok(Self {
            config: config.clone(),
            geometry: g,
            embedding,
            transform,
        })
    }

    /// Build from a saved `prompt_embeddings` `[P, L*2*token_dim]` (a PEFT adapter).
    pub fn from_prompt_embeddings(
        config: &PrefixConfig,
        geometry: PeftGeometry,
        t: &Tensor,
    ) -> Result<Self> {
        let var = Var::from_tensor(&t.to_dtype(DType::F32).ctx("load prompt_embeddings")?)
            .ctx("load prompt_embeddings")?;
        let mut config = config.clone();
        config.projection = false;
        Ok(Self {
            config,
            geometry,
            embedding: var,
            transform: None,
        })
    }

    /// Every trainable parameter, with PEFT's names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![("embedding.weight".to_string(), self.embedding.clone())];
        if let Some((w1, b1, w2, b2)) = &self.transform {
            v.push(("transform.0.weight".into(), w1.clone()));
            v.push(("transform.0.bias".into(), b1.clone()));
            v.push(("transform.2.weight".into(), w2.clone()));
            v.push(("transform.2.bias".into(), b2.clone()));
        }
        v
    }

    /// PEFT's `prompt_embeddings`: `[P, L*2*token_dim]`.
    pub fn forward(&self) -> Result<Tensor> {
        let e = self.embedding.as_tensor();
        match &self.transform {
            None => Ok(e.clone()),
            Some((w1, b1, w2, b2)) => {
                let h = e
                    .matmul(&w1.as_tensor().t().ctx("prefix transform")?)
                    .and_then(|x| x.broadcast_add(b1.as_tensor()))
                    .and_then(|x| x.tanh())
                    .ctx("prefix transform.0")?;
                h.matmul(&w2.as_tensor().t().ctx("prefix transform")?)
                    .and_then(|x| x.broadcast_add(b2.as_tensor()))
                    .ctx("prefix transform.2")
            }
        }
    }

    /// PEFT's `get_prompt`: per-layer keys and values `[B, H, P, D]` for `batch` rows.
    pub fn past_key_values(&self, batch: usize) -> Result<Vec<LayerPrefix>> {
        let g = &self.geometry;
        let (p, l, h, d) = (
            g.num_virtual_tokens,
            g.num_layers,
            g.num_attention_heads,
            g.head_dim(),
        );
        let emb = self.forward()?; // [P, L*2*token_dim]
        let mut x = emb
            .unsqueeze(0)
            .and_then(|x| x.broadcast_as((batch, p, g.embedding_width())))
            .and_then(|x| x.reshape((batch, p, 2 * l, h, d)))
            .ctx("prefix view [B, P, 2L, H, D]")?;
        let sub = g.num_transformer_submodules;
        if sub == 2 {
            // [B, P, 4L, H, D]: PEFT concatenates the tensor with itself.
            x = Tensor::cat(&[&x, &x], 2).ctx("prefix seq2seq duplication")?;
        }
        // [2L*sub, B, H, P, D]
        let x = x.permute([2, 0, 3, 1, 4]).ctx("prefix permute")?;
        let per = 2 * sub;
        let mut out = Vec::with_capacity(l);
        for layer in 0..l {
            let cast = self.config.dtype.dtype();
            let get = |i: usize| -> Result<Tensor> {
                let t = x
                    .get(layer * per + i)
                    .and_then(|t| t.contiguous())
                    .ctx("prefix split")?;
                match cast {
                    Some(dt) => t.to_dtype(dt).ctx("prefix dtype"),
                    None => Ok(t),
                }
            };
            out.push(LayerPrefix {
                key: get(0)?,
                value: get(1)?,
                cross: if sub == 2 && self.config.cross == CrossPrefix::Inject {
                    Some((get(2)?, get(3)?))
                } else {
                    None
                },
            });
        }
        Ok(out)
    }
}

/// Shape one layer's prefix `[B, H, P, D]` for `layout`.
///
/// `BloomLegacy`: keys `[B*H, D, P]`, values `[B*H, P, D]`. `BigcodeFused`: head 0 of
/// keys and values, fused as `[B, P, 2*D]` (what PEFT did for multi-query models).
pub fn shape_for_layout(key: &Tensor, value: &Tensor, layout: Layout) -> Result<(Tensor, Tensor)> {
    match layout {
        Layout::BigcodeFused => {
            let k0 = key.narrow(1, 0, 1).ctx("prefix head 0")?;
            let v0 = value.narrow(1, 0, 1).ctx("prefix head 0")?;
            layout
                .from_standard(&k0, &v0)
                .ctx("prefix to bigcode-fused")
        }
        _ => layout.from_standard(key, value).ctx("prefix to layout"),
    }
}

/// Place a prefix into every layer of `cache`, shaped by `layout` (resolved against
/// the layout the cache stores).
pub fn inject(
    cache: &mut ModelCache,
    prefix: &[LayerPrefix],
    layout: PrefixLayout,
    prefix_len: usize,
) -> Result<()> {
    let target = layout.resolve(cache.layout);
    for (i, lp) in prefix.iter().enumerate() {
        let (k, v) = shape_for_layout(&lp.key, &lp.value, target)?;
        cache.seed(i, Attention::SelfAttn, k, v, prefix_len)?;
        if let Some((ck, cv)) = &lp.cross {
            // transformers' cross cache has always been 4-D.
            cache.seed(i, Attention::Cross, ck.clone(), cv.clone(), prefix_len)?;
        }
    }
    Ok(())
}

/// Extend a padding mask `[B, T]` (1 = token, 0 = padding) by `P` columns of ones on
/// the left, for the prefix positions every query may see: `[B, P + T]`.
pub fn extend_mask(mask: &Tensor, prefix_len: usize) -> Result<Tensor> {
    let b = mask.dim(0).ctx("mask batch")?;
    let ones = Tensor::ones((b, prefix_len), mask.dtype(), mask.device()).ctx("prefix mask")?;
    Tensor::cat(&[&ones, mask], 1).ctx("extend mask by P")
}
