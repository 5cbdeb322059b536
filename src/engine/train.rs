//! Training a prefix: the base model frozen, only the prefix parameters trained with
//! candle-nn's `AdamW`, a loss curve per step, and a gradient check that is a feature
//! of its own (diagnosis class `no-grad`).
//!
//! What one step does, in order:
//! 1. [`RowOrder`] picks `batch_size` rows of the data (seeded epochs of shuffled rows).
//! 2. [`batch_for`] byte-encodes them: decoder-only models read
//!    `"<sentence> => <label>"` with labels shifted left by one; encoder-decoders read
//!    the sentence in the encoder and `<label> EOS` in the decoder. Rows are
//!    right-padded; padding labels are `-100` and padding columns are masked.
//! 3. [`batch_loss`] builds a fresh `CacheMode::None` cache holding the prefix (it keeps
//!    the prefix in the autograd graph), runs one forward pass over the whole sequence
//!    and computes a differentiable masked cross-entropy ([`masked_cross_entropy`]).
//! 4. `backward`, the gradient check after the first step ([`check_prefix_grads`]),
//!    `AdamW::step` over `prefix.vars()` only, and the base-weight check
//!    ([`check_base_unchanged`]) after the first step and at the end.
//!
//! How base weights are checked: the model's weights are plain tensors that no
//! optimizer sees, so the guard is against a regression that makes them trainable
//! (an optimizer built over a `VarMap` that also holds the base model, a weight updated
//! in place through a `Var`). [`BaseWeights::build`] builds the model through a
//! recording `VarBuilder` that keeps a handle on every tensor it served: norms,
//! embeddings and GPT-2 Conv1D weights share storage with the tensors inside the model,
//! so an in-place update of them changes their digest ([`weights::digest`], exact
//! bits). PyTorch `nn.Linear` weights are held transposed (`nn::Linear`, a copy made
//! at load, frozen by construction: its op returns no weight gradient); the check
//! covers the loaded originals.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{AdamW, Init, Optimizer, ParamsAdamW, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, EngineError, Result, TensorKind,
};
use crate::engine::generate::prepare_cache;
use crate::engine::model::{weights, Encoded, Forward, Model, ModelConfig};
use crate::engine::prefix::{extend_mask, PeftGeometry, PrefixEncoder};
use crate::engine::rng::Rng;
use crate::io::data;

/// Label value that is left out of the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Padding id of the byte-level data (byte 0 never occurs in the built-in text; T5's
/// `pad_token_id` is 0 too).
pub const PAD_ID: u32 = 0;

/// End-of-sequence id appended to encoder-decoder labels (T5's `eos_token_id`).
/// The `Model` trait does not expose the config's EOS yet; every T5 config uses 1.
pub const SEQ2SEQ_EOS: u32 = 1;

/// Settings of a training run (the scenario's `train:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps (one batch each).
    pub steps: usize,
    /// AdamW learning rate. The default, 0.1, trains the tiny seeded models well in 30
    /// steps and stays stable over hundreds (measured for every family, P 1..32, flat and
    /// projection); PEFT's examples use 1e-2 to 3e-2 for full-size models.
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seed of the row order (the prefix has its own seed in `PrefixConfig`).
    pub seed: u64,
    /// Rows per step.
    pub batch_size: usize,
    /// Longest sequence in tokens: the text (decoder-only) or the encoder input and
    /// the decoder labels (encoder-decoders) are cut to it.
    pub max_len: usize,
    /// Also compute the mean loss over all rows before and after training
    /// (`TrainReport::data_loss_*`): two extra forward passes over the data.
    pub evaluate: bool,
    /// Historical bug switch: train through candle-nn's fused softmax / norms, which
    /// have no backward pass. The gradient check then reports `no-grad`.
    pub fused_ops: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 30,
            lr: 1e-1,
            weight_decay: 0.0,
            seed: 0,
            batch_size: 4,
            max_len: 64,
            evaluate: true,
            fused_ops: false,
        }
    }
}

impl TrainConfig {
    /// Reject settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::Config(format!("train: {m}")));
        if self.steps == 0 {
            return bad("steps must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.max_len < 2 {
            return bad("max_len must be at least 2 (a causal LM needs a token and its successor)");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a finite positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be a finite number >= 0");
        }
        Ok(())
    }
}

/// Gradient of one prefix parameter after the first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGrad {
    /// PEFT's parameter name (`embedding.weight`, `transform.0.weight`, ...).
    pub name: String,
    pub shape: Vec<usize>,
    /// L2 norm of the gradient.
    pub grad_norm: f64,
}

/// What the gradient check verified.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GradCheck {
    /// Every prefix parameter with its gradient norm (all finite and non-zero).
    pub params: Vec<ParamGrad>,
    /// Slices of `embedding.weight` checked one by one: (virtual token, layer key or
    /// value block) for a flat prefix, virtual tokens for a projection prefix.
    pub slices_checked: usize,
    /// Base weights compared bit for bit after the first step and at the end
    /// (0 when the run was not given the base weights).
    pub base_weights_checked: usize,
}

/// The outcome of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Loss of each step's batch, before that step's update.
    pub losses: Vec<f32>,
    pub grad_check: GradCheck,
    /// Mean token loss over all rows of the data, before training and after it: the
    /// same rows on both sides, so the two numbers compare without batch noise
    /// (`None` unless `TrainConfig::evaluate`).
    pub data_loss_before: Option<f32>,
    pub data_loss_after: Option<f32>,
}

impl TrainReport {
    pub fn first_loss(&self) -> Option<f32> {
        self.losses.first().copied()
    }

    pub fn last_loss(&self) -> Option<f32> {
        self.losses.last().copied()
    }
}

// ---------------------------------------------------------------------------------
// Data

/// One batch, right-padded.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, S]` u32: the text (decoder-only) or the encoder input (encoder-decoders).
    pub ids: Tensor,
    /// `[B, S]` f32, 1 = token, 0 = padding.
    pub mask: Tensor,
    /// Encoder-decoders: decoder input `[B, T]` u32 and its mask `[B, T]` f32.
    pub decoder: Option<(Tensor, Tensor)>,
    /// `[B, T]` i64: the target of every logits position, [`IGNORE_INDEX`] where none
    /// (`T = S` for decoder-only models).
    pub labels: Tensor,
}

/// Right-pad `rows` with `pad`: `(ids [B, S] u32, mask [B, S] f32)`.
fn pad_ids(rows: &[Vec<u32>], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let b = rows.len();
    let s = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * s);
    let mut mask = Vec::with_capacity(b * s);
    for r in rows {
        let n = r.len().min(s);
        ids.extend(r.iter().copied().chain(std::iter::repeat_n(pad, s - n)));
        mask.extend(std::iter::repeat_n(1f32, n).chain(std::iter::repeat_n(0f32, s - n)));
    }
    let ids = Tensor::from_vec(ids, (b, s), device).ctx("batch ids [B, S]")?;
    let mask = Tensor::from_vec(mask, (b, s), device).ctx("batch mask [B, S]")?;
    Ok((ids, mask))
}

/// Right-pad label rows with [`IGNORE_INDEX`] to `s` columns: `[B, s]` i64.
fn pad_labels(rows: &[Vec<i64>], s: usize, device: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(rows.len() * s);
    for r in rows {
        let n = r.len().min(s);
        out.extend(
            r.iter()
                .take(n)
                .copied()
                .chain(std::iter::repeat_n(IGNORE_INDEX, s - n)),
        );
    }
    Tensor::from_vec(out, (rows.len(), s), device).ctx("batch labels [B, T]")
}

/// A causal-LM batch of `"<sentence> => <label>"` texts, byte-encoded, cut to
/// `max_len`: ids `[B, S]`, mask `[B, S]`, labels `[B, S]` = ids shifted left by one
/// (the last token of a row and padding are [`IGNORE_INDEX`]).
pub fn causal_batch(rows: &[(&str, &str)], max_len: usize, device: &Device) -> Result<Batch> {
    if rows.is_empty() {
        return Err(EngineError::Config(
            "train: a batch needs at least one row".into(),
        ));
    }
    let texts: Vec<Vec<u32>> = rows
        .iter()
        .map(|(sentence, label)| {
            let mut ids = data::encode_bytes(&format!("{sentence} => {label}"));
            ids.truncate(max_len);
            ids
        })
        .collect();
    let labels: Vec<Vec<i64>> = texts
        .iter()
        .map(|ids| {
            ids.iter()
                .skip(1)
                .map(|&t| i64::from(t))
                .chain(std::iter::once(IGNORE_INDEX))
                .collect()
        })
        .collect();
    let (ids, mask) = pad_ids(&texts, PAD_ID, device)?; // [B, S]
    let s = ids.dim(1).ctx("batch ids [B, S]")?;
    let labels = pad_labels(&labels, s, device)?; // [B, S]
    Ok(Batch {
        ids,
        mask,
        decoder: None,
        labels,
    })
}

/// A sequence-to-sequence batch: encoder input = sentence ids `[B, S]` (cut to
/// `max_len`), labels = label ids + `eos` `[B, T]` (cut to `max_len`), decoder input =
/// `start` followed by the labels shifted right `[B, T]`.
pub fn seq2seq_batch(
    rows: &[(&str, &str)],
    max_len: usize,
    start: u32,
    eos: u32,
    device: &Device,
) -> Result<Batch> {
    if rows.is_empty() {
        return Err(EngineError::Config(
            "train: a batch needs at least one row".into(),
        ));
    }
    let enc: Vec<Vec<u32>> = rows
        .iter()
        .map(|(sentence, _)| {
            let mut ids = data::encode_bytes(sentence);
            ids.truncate(max_len);
            if ids.is_empty() {
                ids.push(eos);
            }
            ids
        })
        .collect();
    let targets: Vec<Vec<u32>> = rows
        .iter()
        .map(|(_, label)| {
            let mut ids = data::encode_bytes(label);
            ids.push(eos);
            if ids.len() > max_len {
                ids.truncate(max_len.saturating_sub(1));
                ids.push(eos);
            }
            ids
        })
        .collect();
    let dec_in: Vec<Vec<u32>> = targets
        .iter()
        .map(|t| {
            std::iter::once(start)
                .chain(t.iter().take(t.len().saturating_sub(1)).copied())
                .collect()
        })
        .collect();
    let labels: Vec<Vec<i64>> = targets
        .iter()
        .map(|t| t.iter().map(|&x| i64::from(x)).collect())
        .collect();
    let (ids, mask) = pad_ids(&enc, PAD_ID, device)?; // [B, S]
    let (dec_ids, dec_mask) = pad_ids(&dec_in, PAD_ID, device)?; // [B, T]
    let t = dec_ids.dim(1).ctx("decoder ids [B, T]")?;
    let labels = pad_labels(&labels, t, device)?; // [B, T]
    Ok(Batch {
        ids,
        mask,
        decoder: Some((dec_ids, dec_mask)),
        labels,
    })
}

/// The batch `model` trains on: seq2seq for encoder-decoders, causal LM otherwise.
pub fn batch_for(
    model: &dyn Model,
    rows: &[(&str, &str)],
    max_len: usize,
    device: &Device,
) -> Result<Batch> {
    if model.geometry().encoder_decoder {
        seq2seq_batch(
            rows,
            max_len,
            model.decoder_start_token_id(),
            SEQ2SEQ_EOS,
            device,
        )
    } else {
        causal_batch(rows, max_len, device)
    }
}

/// The batch of every training step, in order: `cfg.batch_size` rows a step in the
/// seeded [`RowOrder`], built by [`batch_for`]. The Python stack is fed these same
/// batches (`--against peft`).
pub fn step_batches(
    model: &dyn Model,
    cfg: &TrainConfig,
    rows: &[(&str, &str)],
    device: &Device,
) -> Result<Vec<Batch>> {
    let mut order = RowOrder::new(cfg.seed, rows.len());
    (0..cfg.steps)
        .map(|_| {
            let picked: Vec<(&str, &str)> = order
                .take(cfg.batch_size)
                .into_iter()
                .filter_map(|i| rows.get(i).copied())
                .collect();
            batch_for(model, &picked, cfg.max_len, device)
        })
        .collect()
}

/// Seeded order of data rows: epochs of shuffled rows (Fisher-Yates with the portable
/// generator), so every row is seen once per epoch and the order is the same on every
/// platform.
#[derive(Debug, Clone)]
pub struct RowOrder {
    rng: Rng,
    perm: Vec<usize>,
    pos: usize,
}

impl RowOrder {
    pub fn new(seed: u64, rows: usize) -> Self {
        Self {
            rng: Rng::for_name(seed, "train.rows"),
            perm: (0..rows).collect(),
            pos: rows,
        }
    }

    /// The next `n` row indices (empty when there are no rows).
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        let len = self.perm.len();
        if len == 0 {
            return vec![];
        }
        (0..n)
            .map(|_| {
                if self.pos >= len {
                    for i in (1..len).rev() {
                        let j = self.rng.below(i as u64 + 1) as usize;
                        self.perm.swap(i, j);
                    }
                    self.pos = 0;
                }
                let r = self.perm[self.pos];
                self.pos += 1;
                r
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// Loss

/// Sum of the negative log-likelihood over labelled positions, and their number.
/// `logits: [B, T, V]`, `labels: [B, T]` i64 with [`IGNORE_INDEX`] -> (scalar, count).
///
/// Differentiable in the logits (`nn::cross_entropy_rows` has its own backward pass).
fn nll_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3().ctx("logits [B, T, V]")?;
    let (lb, lt) = labels.dims2().ctx("labels [B, T]")?;
    if (lb, lt) != (b, t) {
        return Err(Diagnosis::new(
            DiagnosisClass::Shape,
            format!("logits cover [{b}, {t}] positions but the labels are [{lb}, {lt}]"),
        )
        .shapes(&[b, t], &[lb, lt])
        .hint("the decoder input and the labels were padded to different lengths")
        .into());
    }
    let host: Vec<i64> = labels
        .flatten_all()
        .and_then(|l| l.to_dtype(DType::I64))
        .and_then(|l| l.to_vec1())
        .ctx("labels")?;
    let count = host.iter().filter(|&&x| x >= 0).count();
    if let Some(&bad) = host.iter().find(|&&x| x >= v as i64) {
        return Err(EngineError::Config(format!(
            "train: label id {bad} is outside the model's vocabulary of {v}"
        )));
    }
    let dev = logits.device();
    let weights: Vec<f32> = host.iter().map(|&x| f32::from(u8::from(x >= 0))).collect();
    let targets: Vec<u32> = host.iter().map(|&x| x.max(0) as u32).collect();
    // [B*T]
    let weights = Tensor::from_vec(weights, b * t, dev).ctx("label weights")?;
    // [B*T, V]
    let logits = logits
        .to_dtype(DType::F32)
        .and_then(|l| l.reshape((b * t, v)))
        .ctx("logits")?;
    // [B*T]
    let nll =
        crate::engine::model::nn::cross_entropy_rows(&logits, &targets).ctx("cross-entropy")?;
    let sum = (nll * weights)
        .and_then(|x| x.sum_all())
        .ctx("masked nll")?;
    Ok((sum, count))
}

/// Mean cross-entropy over labelled positions: `logits: [B, T, V]`, `labels: [B, T]`
/// i64 ([`IGNORE_INDEX`] ignored) -> scalar `[]`, differentiable.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (sum, count) = nll_sum(logits, labels)?;
    if count == 0 {
        return Err(EngineError::Config(
            "train: the batch has no labelled position".into(),
        ));
    }
    (sum / count as f64).ctx("mean loss")
}

/// Logits of one forward pass over `batch` with the prefix in a fresh `none` cache
/// (the prefix stays in the autograd graph): `[B, T, V]`.
pub fn batch_logits(model: &dyn Model, prefix: &PrefixEncoder, batch: &Batch) -> Result<Tensor> {
    batch_logits_in(model, prefix, batch, &CacheConfig::new(CacheMode::None))
}

/// [`batch_logits`] with the prefix in a cache of any mode: `[B, T, V]`. Only `none`
/// keeps the prefix in the autograd graph; the other modes store detached tensors
/// (candle-nn's caches detach), which the gradient check reports as `no-grad`.
pub fn batch_logits_in(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    batch: &Batch,
    cache_cfg: &CacheConfig,
) -> Result<Tensor> {
    let (b, _s) = batch.ids.dims2().ctx("batch ids [B, S]")?;
    let p = prefix.geometry.num_virtual_tokens;
    let mut cache = prepare_cache(model, Some(prefix), cache_cfg, prefix.config.layout, b)?;
    let encoded: Option<Encoded> = match &batch.decoder {
        Some(_) => Some(model.encode(&batch.ids, &batch.mask)?),
        None => None,
    };
    // ids [B, T], padding mask [B, T]
    let (ids, pad) = match &batch.decoder {
        Some((d, m)) => (d, m),
        None => (&batch.ids, &batch.mask),
    };
    let mask = extend_mask(pad, p)?; // [B, P + T]
    cache.next_step();
    model.forward(
        ids,
        &mut Forward {
            cache: &mut cache,
            mask: &mask,
            encoder: encoded.as_ref(),
            last_only: false,
        },
    )
}

/// The training loss of `batch`: scalar `[]`, in the graph of the prefix parameters.
pub fn batch_loss(model: &dyn Model, prefix: &PrefixEncoder, batch: &Batch) -> Result<Tensor> {
    let logits = batch_logits(model, prefix, batch)?; // [B, T, V]
    masked_cross_entropy(&logits, &batch.labels)
}

/// Mean token loss over all of `rows`, in chunks of `batch_size` (no update).
pub fn data_loss(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    rows: &[(&str, &str)],
    cfg: &TrainConfig,
) -> Result<f32> {
    let device = prefix.embedding.device().clone();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in rows.chunks(cfg.batch_size.max(1)) {
        let batch = batch_for(model, chunk, cfg.max_len, &device)?;
        let logits = batch_logits(model, prefix, &batch)?; // [B, T, V]
        let (sum, n) = nll_sum(&logits, &batch.labels)?;
        total += f64::from(sum.to_scalar::<f32>().ctx("loss value")?);
        count += n;
    }
    if count == 0 {
        return Err(EngineError::Config(
            "train: the data has no labelled position".into(),
        ));
    }
    Ok((total / count as f64) as f32)
}

// ---------------------------------------------------------------------------------
// Gradient check

fn no_grad(message: String) -> Diagnosis {
    Diagnosis::new(DiagnosisClass::NoGrad, message).hint(
        "the graph between the prefix and the loss was cut: a fused candle op without backward (softmax_last_dim, rms_norm, layer_norm, rope), a cache that detaches what it stores (train with cache: none), or a detach/copy of the prefix",
    )
}

/// L2 norm and number of non-finite values of a tensor.
fn norm_of(t: &Tensor) -> Result<(f64, usize)> {
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .and_then(|g| g.flatten_all())
        .and_then(|g| g.to_vec1())
        .ctx("gradient values")?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    let sq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    Ok((sq.sqrt(), bad))
}

/// Check that every variable in `vars` has a finite, non-zero gradient in `grads`.
/// A variable with no gradient, a non-finite one or an all-zero one is a `no-grad`
/// diagnosis naming it. Works on any `GradStore` and any named variables.
pub fn check_grads(grads: &GradStore, vars: &[(String, Var)]) -> Result<Vec<ParamGrad>> {
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let shape = var.dims().to_vec();
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            no_grad(format!(
                "prefix parameter `{name}` {shape:?} received no gradient"
            ))
        })?;
        let (norm, bad) = norm_of(g)?;
        if bad > 0 {
            return Err(Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!("prefix parameter `{name}` {shape:?} has {bad} non-finite gradient values"),
            )
            .hint("NaN or infinity reached the backward pass: check the loss, the mask (a fully masked row) and the learning rate")
            .into());
        }
        if norm == 0.0 {
            return Err(no_grad(format!(
                "prefix parameter `{name}` {shape:?} received an all-zero gradient"
            ))
            .into());
        }
        out.push(ParamGrad {
            name: name.clone(),
            shape,
            grad_norm: norm,
        });
    }
    Ok(out)
}

/// Where block `j` of a flat prefix (`prompt_embeddings` viewed as `[P, 2L, H*D]`) is
/// used, following PEFT's `get_prompt` (the tensor is concatenated with itself for
/// encoder-decoders, then split per layer into self key, self value[, cross key,
/// cross value]).
pub fn block_uses(g: &PeftGeometry, j: usize) -> Vec<(usize, Attention, TensorKind)> {
    let l2 = 2 * g.num_layers;
    let per = 2 * g.num_transformer_submodules;
    (0..l2 * g.num_transformer_submodules)
        .filter(|c| l2 > 0 && c % l2 == j)
        .map(|c| {
            let i = c % per;
            let att = if i < 2 {
                Attention::SelfAttn
            } else {
                Attention::Cross
            };
            let kind = if i.is_multiple_of(2) {
                TensorKind::Key
            } else {
                TensorKind::Value
            };
            (c / per, att, kind)
        })
        .collect()
}

fn uses_text(uses: &[(usize, Attention, TensorKind)]) -> String {
    uses.iter()
        .map(|(l, a, k)| format!("layer {l} {a} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gradient check of a prefix after one backward pass: [`check_grads`] over every
/// prefix parameter, then every slice of `embedding.weight` on its own: for a flat
/// prefix each (virtual token, layer key/value block), for a projection prefix each
/// virtual token. A slice with an exactly zero or non-finite gradient is a `no-grad`
/// diagnosis naming the layer, self/cross attention and key/value it feeds (a fused
/// softmax in attention, for example, leaves the values with a gradient and the keys
/// with none: the whole-tensor norm alone would not notice).
pub fn check_prefix_grads(grads: &GradStore, prefix: &PrefixEncoder) -> Result<GradCheck> {
    let vars = prefix.vars();
    let params = match check_grads(grads, &vars) {
        Ok(p) => p,
        Err(EngineError::Shape(mut d)) => {
            if d.message.contains("`transform.0.weight`")
                && prefix.transform.is_some()
                && embedding_is_zero(prefix)?
            {
                d.hint = "with `init: zero` and a projection prefix, transform.0.weight gets an exactly zero gradient at the first step (its input, the embedding, is zero); use `init: random`".into();
            }
            return Err(EngineError::Shape(d));
        }
        Err(e) => return Err(e),
    };
    let g = &prefix.geometry;
    let p = g.num_virtual_tokens;
    let grad = grads.get(prefix.embedding.as_tensor()).ok_or_else(|| {
        no_grad("prefix parameter `embedding.weight` received no gradient".into())
    })?;
    let mut slices = 0;
    if prefix.transform.is_none() {
        let blocks = 2 * g.num_layers;
        // [P, 2L]
        let norms: Vec<Vec<f32>> = grad
            .reshape((p, blocks, g.token_dim))
            .and_then(|x| x.sqr())
            .and_then(|x| x.sum(2))
            .and_then(|x| x.to_vec2())
            .ctx("prefix gradient per block [P, 2L]")?;
        for (tok, row) in norms.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                slices += 1;
                if n > 0.0 && n.is_finite() {
                    continue;
                }
                let uses = block_uses(g, j);
                let dropped = prefix.config.cross == crate::engine::prefix::CrossPrefix::Drop;
                if dropped && uses.iter().all(|(_, a, _)| *a == Attention::Cross) {
                    // Only the dropped cross-attention prefix reads this block.
                    continue;
                }
                let what = if n.is_finite() {
                    "an exactly zero"
                } else {
                    "a non-finite"
                };
                let mut d = no_grad(format!(
                    "prefix parameter `embedding.weight`: virtual token {tok}, block {j} of {blocks} ({}) received {what} gradient",
                    uses_text(&uses)
                ));
                if let Some(&(l, a, k)) = uses.first() {
                    d = d.at(l, a, k);
                }
                return Err(d.into());
            }
        }
    } else {
        // [P]
        let norms: Vec<f32> = grad
            .sqr()
            .and_then(|x| x.sum(1))
            .and_then(|x| x.to_vec1())
            .ctx("prefix gradient per virtual token [P]")?;
        for (tok, &n) in norms.iter().enumerate() {
            slices += 1;
            if !(n > 0.0 && n.is_finite()) {
                return Err(no_grad(format!(
                    "prefix parameter `embedding.weight`: virtual token {tok} received no usable gradient (squared norm {n})"
                ))
                .into());
            }
        }
    }
    Ok(GradCheck {
        params,
        slices_checked: slices,
        base_weights_checked: 0,
    })
}

fn embedding_is_zero(prefix: &PrefixEncoder) -> Result<bool> {
    let (n, _) = norm_of(prefix.embedding.as_tensor())?;
    Ok(n == 0.0)
}

// ---------------------------------------------------------------------------------
// Base weights

/// A `VarBuilder` backend that serves another `VarBuilder`'s tensors and keeps a
/// handle on each (the tensor the model was built from).
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    served: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: &Tensor) -> candle_core::Result<()> {
        self.served
            .lock()
            .map_err(|_| candle_core::Error::Msg("weights recorder lock poisoned".into()))?
            .insert(name.to_string(), t.clone());
        Ok(())
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, &t)?;
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.keep(name, &t)?;
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The weights of a base model by Hugging Face name, sharing storage with the tensors
/// the model holds.
#[derive(Debug, Clone, Default)]
pub struct BaseWeights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl BaseWeights {
    /// Build `cfg` from `vb` (seeded, safetensors, a `VarMap`, ...) and record every
    /// weight the model asked for.
    pub fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<(Box<dyn Model>, BaseWeights)> {
        let served: Arc<Mutex<BTreeMap<String, Tensor>>> = Default::default();
        let (dtype, device, path) = (vb.dtype(), vb.device().clone(), vb.prefix());
        let rec = Recorder {
            inner: vb.root(),
            served: served.clone(),
        };
        let mut outer = VarBuilder::from_backend(Box::new(rec), dtype, device);
        if !path.is_empty() {
            outer = outer.pp(path);
        }
        let model = cfg.build(outer)?;
        let tensors = served
            .lock()
            .map_err(|_| EngineError::Config("weights recorder lock poisoned".into()))?
            .clone();
        Ok((model, BaseWeights { tensors }))
    }

    /// [`BaseWeights::build`] over seeded weights (the same weights as
    /// `weights::seeded(seed, F32, device)`).
    pub fn seeded(
        cfg: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(Box<dyn Model>, BaseWeights)> {
        Self::build(cfg, weights::seeded(seed, DType::F32, device))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Exact-bits digest of every weight.
    pub fn digests(&self) -> Result<BTreeMap<String, u64>> {
        self.tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), weights::digest(t).ctx("digest base weight")?)))
            .collect()
    }
}

/// Compare the base weights with digests taken before training. A changed (or
/// vanished) weight is a `no-grad` diagnosis naming it. Returns the number compared.
pub fn check_base_unchanged(
    before: &BTreeMap<String, u64>,
    base: &BaseWeights,
    when: &str,
) -> Result<usize> {
    for (name, &d0) in before {
        let t = base.tensors.get(name).ok_or_else(|| {
            Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!("base weight `{name}` disappeared {when}"),
            )
        })?;
        let d1 = weights::digest(t).ctx("digest base weight")?;
        if d1 != d0 {
            return Err(Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!(
                    "base weight `{name}` {:?} changed {when} (digest {d0:016x} -> {d1:016x}); only the prefix may train",
                    t.dims()
                ),
            )
            .hint("the optimizer was given base-model variables (e.g. all vars of a VarMap holding the model) or a base weight was updated in place")
            .into());
        }
    }
    Ok(before.len())
}

// ---------------------------------------------------------------------------------
// Training

/// Train `prefix` on the built-in data ([`data::SENTIMENT`]) with `model` frozen.
/// Base weights are not compared (use [`train_checked`] for that).
pub fn train(model: &dyn Model, prefix: &PrefixEncoder, cfg: &TrainConfig) -> Result<TrainReport> {
    train_on(model, None, prefix, cfg, data::SENTIMENT)
}

/// [`train`], also proving that every base weight is bit-identical after the first
/// step and at the end.
pub fn train_checked(
    model: &dyn Model,
    base: &BaseWeights,
    prefix: &PrefixEncoder,
    cfg: &TrainConfig,
) -> Result<TrainReport> {
    train_on(model, Some(base), prefix, cfg, data::SENTIMENT)
}

/// Train `prefix` on `rows` (`(sentence, label)` pairs) with `model` frozen.
pub fn train_on(
    model: &dyn Model,
    base: Option<&BaseWeights>,
    prefix: &PrefixEncoder,
    cfg: &TrainConfig,
    rows: &[(&str, &str)],
) -> Result<TrainReport> {
    cfg.validate()?;
    if cfg.fused_ops {
        let plain = TrainConfig {
            fused_ops: false,
            ..cfg.clone()
        };
        return crate::engine::model::nn::with_fused_ops(|| {
            train_on(model, base, prefix, &plain, rows)
        });
    }
    if rows.is_empty() {
        return Err(EngineError::Config("train: the data has no rows".into()));
    }
    let device = prefix.embedding.device().clone();
    let vars = prefix.vars();
    let before = base.map(BaseWeights::digests).transpose()?;
    let params = ParamsAdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)
        .ctx("create AdamW over the prefix parameters")?;
    let evaluate = |when: &str| -> Result<Option<f32>> {
        if !cfg.evaluate {
            return Ok(None);
        }
        let v = data_loss(model, prefix, rows, cfg)?;
        if !v.is_finite() {
            return Err(Diagnosis::new(
                DiagnosisClass::NonFinite,
                format!("the loss over all rows is {v} {when}"),
            )
            .hint(
                "NaN or infinity in the forward pass: check the prefix init and the model weights",
            )
            .into());
        }
        Ok(Some(v))
    };
    let data_loss_before = evaluate("before training")?;
    let mut losses = Vec::with_capacity(cfg.steps);
    let mut grad_check = GradCheck::default();
    for (step, batch) in step_batches(model, cfg, rows, &device)?.iter().enumerate() {
        let loss = batch_loss(model, prefix, batch)?; // []
        let value = loss.to_scalar::<f32>().ctx("loss value")?;
        if !value.is_finite() {
            return Err(Diagnosis::new(
                DiagnosisClass::NonFinite,
                format!("training loss is {value} at step {step} (of {})", cfg.steps),
            )
            .hint("NaN or infinity in the forward pass: check the learning rate, the prefix init and fully masked attention rows")
            .into());
        }
        losses.push(value);
        let grads = loss.backward().ctx("backward")?;
        if step == 0 {
            grad_check = check_prefix_grads(&grads, prefix)?;
        }
        opt.step(&grads).ctx("AdamW step")?;
        if let (0, Some(d), Some(b)) = (step, &before, base) {
            grad_check.base_weights_checked = check_base_unchanged(d, b, "after step 0")?;
        }
    }
    if let (Some(d), Some(b)) = (&before, base) {
        let when = format!("after {} training steps", cfg.steps);
        grad_check.base_weights_checked = check_base_unchanged(d, b, &when)?;
    }
    let data_loss_after = evaluate("after training")?;
    Ok(TrainReport {
        losses,
        grad_check,
        data_loss_before,
        data_loss_after,
    })
}
