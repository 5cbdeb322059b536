//! Batches of the training data (byte-encoded, right-padded, labels shifted) and the
//! masked cross-entropy loss over them.

use candle_core::{DType, Device, Tensor};

use super::{TrainConfig, IGNORE_INDEX, PAD_ID, SEQ2SEQ_EOS};
use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::diagnosis::{CandleExt, Diagnosis, DiagnosisClass, EngineError, Result};
use crate::engine::generate::prepare_cache;
use crate::engine::model::{Encoded, Forward, Model, Ops};
use crate::engine::prefix::{extend_mask, PrefixEncoder};
use crate::engine::rng::Rng;
use crate::io::data;

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

/// The right-padded [`Batch`] of the id rows `ids`, the decoder input rows `decoder`
/// (encoder-decoders) and the label rows, padded to the width the logits have: the
/// decoder's `T`, else the ids' `S`.
fn padded(
    ids: &[Vec<u32>],
    decoder: Option<&[Vec<u32>]>,
    labels: &[Vec<i64>],
    device: &Device,
) -> Result<Batch> {
    let (ids, mask) = pad_ids(ids, PAD_ID, device)?; // [B, S]
    let decoder = decoder
        .map(|rows| pad_ids(rows, PAD_ID, device))
        .transpose()?; // [B, T]
    let width = match &decoder {
        Some((dec_ids, _)) => dec_ids.dim(1).ctx("decoder ids [B, T]")?,
        None => ids.dim(1).ctx("batch ids [B, S]")?,
    };
    let labels = pad_labels(labels, width, device)?; // [B, width]
    Ok(Batch {
        ids,
        mask,
        decoder,
        labels,
    })
}

/// `text(sentence, label)` of every row, byte-encoded and cut to `max_len` tokens.
/// A batch needs at least one row.
fn encode_rows(
    rows: &[(&str, &str)],
    max_len: usize,
    text: impl Fn(&str, &str) -> String,
) -> Result<Vec<Vec<u32>>> {
    if rows.is_empty() {
        return Err(EngineError::Config(
            "train: a batch needs at least one row".into(),
        ));
    }
    Ok(rows
        .iter()
        .map(|(sentence, label)| {
            let mut ids = data::encode_bytes(&text(sentence, label));
            ids.truncate(max_len);
            ids
        })
        .collect())
}

/// A causal-LM batch of `"<sentence> => <label>"` texts, byte-encoded, cut to
/// `max_len`: ids `[B, S]`, mask `[B, S]`, labels `[B, S]` = ids shifted left by one
/// (the last token of a row and padding are [`IGNORE_INDEX`]).
pub fn causal_batch(rows: &[(&str, &str)], max_len: usize, device: &Device) -> Result<Batch> {
    let texts = encode_rows(rows, max_len, |sentence, label| {
        format!("{sentence} => {label}")
    })?;
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
    padded(&texts, None, &labels, device)
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
    let mut enc = encode_rows(rows, max_len, |sentence, _| sentence.to_string())?;
    for ids in enc.iter_mut().filter(|ids| ids.is_empty()) {
        ids.push(eos);
    }
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
    padded(&enc, Some(&dec_in), &labels, device)
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
/// (the prefix stays in the autograd graph), with the crate's kernels: `[B, T, V]`.
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
    pass_logits(model, prefix, batch, cache_cfg, Ops::Kernels)
}

/// [`batch_logits_in`] with the kernels of `ops` (the encoder's too): `[B, T, V]`.
fn pass_logits(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    batch: &Batch,
    cache_cfg: &CacheConfig,
    ops: Ops,
) -> Result<Tensor> {
    let (b, _s) = batch.ids.dims2().ctx("batch ids [B, S]")?;
    let p = prefix.geometry.num_virtual_tokens;
    let mut cache = prepare_cache(model, Some(prefix), cache_cfg, prefix.config.layout, b)?;
    let encoded: Option<Encoded> = match &batch.decoder {
        Some(_) => Some(model.encode(&batch.ids, &batch.mask, ops)?),
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
            ops,
        },
    )
}

/// The training loss of `batch`: scalar `[]`, in the graph of the prefix parameters,
/// with the crate's kernels.
pub fn batch_loss(model: &dyn Model, prefix: &PrefixEncoder, batch: &Batch) -> Result<Tensor> {
    batch_loss_with(model, prefix, batch, Ops::Kernels)
}

/// [`batch_loss`] with the kernels of `ops`: scalar `[]`.
pub(crate) fn batch_loss_with(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    batch: &Batch,
    ops: Ops,
) -> Result<Tensor> {
    let none = CacheConfig::new(CacheMode::None);
    let logits = pass_logits(model, prefix, batch, &none, ops)?; // [B, T, V]
    masked_cross_entropy(&logits, &batch.labels)
}

/// Mean token loss over all of `rows`, in chunks of `batch_size` (no update), with the
/// kernels of `cfg.ops()`.
pub fn data_loss(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    rows: &[(&str, &str)],
    cfg: &TrainConfig,
) -> Result<f32> {
    let device = prefix.embedding.device().clone();
    let (mut total, mut count) = (0f64, 0usize);
    let none = CacheConfig::new(CacheMode::None);
    for chunk in rows.chunks(cfg.batch_size.max(1)) {
        let batch = batch_for(model, chunk, cfg.max_len, &device)?;
        let logits = pass_logits(model, prefix, &batch, &none, cfg.ops())?; // [B, T, V]
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
