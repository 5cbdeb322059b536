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
//!    and computes a differentiable masked cross-entropy ([`masked_cross_entropy`]),
//!    with the kernels of [`TrainConfig::ops`].
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
//! so an in-place update of them changes their digest ([`weights::digest`](crate::engine::model::weights::digest), exact
//! bits). PyTorch `nn.Linear` weights are held transposed (`nn::Linear`, a copy made
//! at load, frozen by construction: its op returns no weight gradient); the check
//! covers the loaded originals.

use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::engine::diagnosis::{CandleExt, Diagnosis, DiagnosisClass, EngineError, Result};
use crate::engine::model::{Model, Ops};
use crate::engine::prefix::PrefixEncoder;
use crate::io::data;

mod batch;
mod checks;
use batch::batch_loss_with;
pub use batch::{
    batch_for, batch_logits, batch_logits_in, batch_loss, causal_batch, data_loss,
    masked_cross_entropy, seq2seq_batch, step_batches, Batch, RowOrder,
};
pub use checks::{block_uses, check_base_unchanged, check_grads, check_prefix_grads, BaseWeights};

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
    /// The ops mode of every forward pass: [`Ops::Fused`] with `fused_ops`, else
    /// [`Ops::Kernels`].
    pub fn ops(&self) -> Ops {
        if self.fused_ops {
            Ops::Fused
        } else {
            Ops::Kernels
        }
    }

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
        let loss = batch_loss_with(model, prefix, batch, cfg.ops())?; // []
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
