//! Built-in data and tokenizer, so the default scenarios need no download.
//!
//! The built-in tokenizer maps UTF-8 bytes to ids 0..=255 (the tiny models have a
//! vocabulary of 256); it is exact, reversible and identical on every platform.

use candle_core::{DType, Device, Tensor};

use crate::engine::diagnosis::{CandleExt, Result};

/// Short sentences with a sentiment label (in the spirit of PEFT's seq2seq
/// prefix-tuning notebook, written for this project).
pub const SENTIMENT: &[(&str, &str)] = &[
    ("the service was quick and the staff were kind", "positive"),
    ("the package arrived broken and late", "negative"),
    ("a calm, bright room with a lovely view", "positive"),
    ("the update deleted my saved files", "negative"),
    ("great value, works exactly as described", "positive"),
    ("the battery dies after an hour", "negative"),
    ("friendly support solved it in minutes", "positive"),
    ("noisy, crowded and overpriced", "negative"),
];

/// The prompts used when a scenario gives none: the sentences of [`SENTIMENT`].
pub fn default_prompts() -> Vec<String> {
    SENTIMENT.iter().map(|(s, _)| s.to_string()).collect()
}

/// Byte-level ids of `text`.
pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Text of byte-level ids (ids above 255 and invalid UTF-8 are shown escaped).
pub fn decode_bytes(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A batch of `batch` rows taken cyclically from `prompts` (byte-level ids), each cut
/// to at most `max_len` ids and left-padded (id `pad_id`) to the longest row.
/// Returns `(ids [B, S] u32, mask [B, S] f32)`.
pub fn batch(
    prompts: &[String],
    batch: usize,
    max_len: usize,
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| encode_bytes(p)).collect();
    batch_ids(&rows, batch, max_len, pad_id, device)
}

/// [`batch`] over rows already tokenized. Returns `(ids [B, S] u32, mask [B, S] f32)`.
pub fn batch_ids(
    prompts: &[Vec<u32>],
    batch: usize,
    max_len: usize,
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    if prompts.is_empty() {
        return Err(crate::engine::diagnosis::EngineError::Config(
            "data: no prompts".into(),
        ));
    }
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            let mut ids = prompts[i % prompts.len()].clone();
            ids.truncate(max_len.max(1));
            if ids.is_empty() {
                ids.push(pad_id);
            }
            ids
        })
        .collect();
    let s = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(batch * s);
    let mut mask = Vec::with_capacity(batch * s);
    for r in &rows {
        let pad = s - r.len();
        ids.extend(std::iter::repeat_n(pad_id, pad).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0f32, pad).chain(std::iter::repeat_n(1f32, r.len())));
    }
    let ids = Tensor::from_vec(ids, (batch, s), device).ctx("batch ids")?;
    let mask = Tensor::from_vec(mask, (batch, s), device)
        .and_then(|m| m.to_dtype(DType::F32))
        .ctx("batch mask")?;
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let s = "prefix — tuning";
        assert_eq!(decode_bytes(&encode_bytes(s)), s);
    }

    #[test]
    fn batches_are_left_padded_with_a_mask() {
        let p = vec!["ab".to_string(), "abcd".to_string()];
        let (ids, mask) = batch(&p, 3, 16, 0, &Device::Cpu).unwrap();
        assert_eq!(ids.dims(), &[3, 4]);
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        assert_eq!(ids[0], vec![0, 0, 97, 98]);
        assert_eq!(ids[2], ids[0], "rows repeat cyclically");
        let mask: Vec<Vec<f32>> = mask.to_vec2().unwrap();
        assert_eq!(mask[0], vec![0., 0., 1., 1.]);
        assert_eq!(mask[1], vec![1.; 4]);
    }
}
