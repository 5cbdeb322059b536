//! Loading a resolved model folder: its weight files (single or sharded safetensors),
//! the tensors, the model built from `config.json`, and the tokenizer when present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{
    cfg_err, list_files, HubOptions, ModelFiles, ModelSource, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
};
use crate::engine::diagnosis::{EngineError, Result};
use crate::engine::model::{Model, ModelConfig};
use crate::engine::train::BaseWeights;
use crate::io::tokenizer::Tokenizer;

/// The weight files of a model folder: `model.safetensors`, else the shards named by
/// `model.safetensors.index.json` (each once, in name order).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        return Ok(shards_of_index(&index)?.0);
    }
    if dir.join(PICKLE_WEIGHTS_FILE).is_file() {
        return Err(cfg_err(format!(
            "{}: only safetensors weights are supported, found {PICKLE_WEIGHTS_FILE} (a pickle); \
             re-save the model with `save_pretrained(dir, safe_serialization=True)`",
            dir.display()
        )));
    }
    Err(cfg_err(format!(
        "{}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {} (found: {})",
        single.display(),
        dir.display(),
        list_files(dir)
    )))
}

/// The shard files of an index, and which shard each tensor is in.
fn shards_of_index(index: &Path) -> Result<(Vec<PathBuf>, HashMap<String, String>)> {
    let text =
        std::fs::read_to_string(index).map_err(|e| cfg_err(format!("{}: {e}", index.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| cfg_err(format!("{}: not valid JSON: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| cfg_err(format!("{}: no object field `weight_map`", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut weight_map = HashMap::new();
    let mut shards: Vec<String> = vec![];
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            cfg_err(format!(
                "{}: `weight_map.{tensor}` is not a file name",
                index.display()
            ))
        })?;
        // A shard is a plain file name next to the index.
        if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." || shard == "." {
            return Err(cfg_err(format!(
                "{}: shard `{shard}` of `{tensor}` is not a plain file name",
                index.display()
            )));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
        weight_map.insert(tensor.clone(), shard.to_string());
    }
    if shards.is_empty() {
        return Err(cfg_err(format!(
            "{}: `weight_map` is empty",
            index.display()
        )));
    }
    shards.sort();
    let mut files = vec![];
    for s in shards {
        let p = dir.join(&s);
        if !p.is_file() {
            return Err(cfg_err(format!(
                "{}: shard named by {WEIGHTS_INDEX_FILE} not found",
                p.display()
            )));
        }
        files.push(p);
    }
    Ok((files, weight_map))
}

/// Read safetensors files into one map of tensors (by Hugging Face name), with candle's
/// safe buffered loader. A truncated or corrupt file, or a tensor present in two files,
/// is an error naming the file.
pub fn load_weights(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all: HashMap<String, Tensor> = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| cfg_err(format!("{}: {e}", f.display())))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            cfg_err(format!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                f.display()
            ))
        })?;
        for (name, t) in tensors {
            if let Some(prev) = origin.get(&name) {
                return Err(cfg_err(format!(
                    "tensor `{name}` is in both {} and {}",
                    prev.display(),
                    f.display()
                )));
            }
            origin.insert(name.clone(), f.clone());
            all.insert(name, t);
        }
    }
    Ok(all)
}

/// Load resolved files: config, weights (converted to f32), tokenizer if present.
pub fn load_files(
    files: &ModelFiles,
    device: &Device,
) -> Result<(ModelConfig, Box<dyn Model>, Option<Tokenizer>)> {
    let (cfg, model, _, tokenizer) = load_files_recorded(files, device)?;
    Ok((cfg, model, tokenizer))
}

/// What [`load_files_recorded`] returns: config, model, every weight it read, tokenizer.
pub type Recorded = (ModelConfig, Box<dyn Model>, BaseWeights, Option<Tokenizer>);

/// [`load_files`], also returning every weight the model read ([`BaseWeights`]), so
/// training can prove the base model stayed bit-identical.
pub fn load_files_recorded(files: &ModelFiles, device: &Device) -> Result<Recorded> {
    let text = std::fs::read_to_string(&files.config)
        .map_err(|e| cfg_err(format!("{}: {e}", files.config.display())))?;
    let cfg = ModelConfig::from_hf_json(&text).map_err(|e| match e {
        EngineError::Config(m) => cfg_err(format!("{m} (in {})", files.config.display())),
        other => other,
    })?;
    let tensors = load_weights(&files.weights, device)?;
    // Sharded checkpoints: every tensor the index names must be in its shard.
    let index = files.dir.join(WEIGHTS_INDEX_FILE);
    if !files.dir.join(WEIGHTS_FILE).is_file() && index.is_file() {
        let (_, weight_map) = shards_of_index(&index)?;
        let mut missing: Vec<String> = weight_map
            .iter()
            .filter(|(t, _)| !tensors.contains_key(*t))
            .map(|(t, s)| format!("{t} (in {s})"))
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(cfg_err(format!(
                "{}: tensors named by the index are missing from their shards: {}",
                index.display(),
                missing.join(", ")
            )));
        }
    }
    for (name, t) in tensors.iter() {
        if !t.dtype().is_float() {
            return Err(cfg_err(format!(
                "{}: tensor `{name}` has dtype {:?}, expected a float type",
                files.source,
                t.dtype()
            )));
        }
    }
    let weights_desc = files
        .weights
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let (model, base) = BaseWeights::build(&cfg, vb).map_err(|e| match e {
        EngineError::Candle { context, source } => EngineError::Candle {
            context: format!("{weights_desc}: {context}"),
            source,
        },
        EngineError::Config(m) => cfg_err(format!("{weights_desc}: {m}")),
        other => other,
    })?;
    let tokenizer = match &files.tokenizer {
        Some(p) => Some(Tokenizer::from_file(p)?),
        None => None,
    };
    Ok((cfg, model, base, tokenizer))
}

/// Load a model from `source`: `(config, model, tokenizer if the folder has one)`.
/// A Hub source is looked up in the cache the environment selects
/// ([`HubOptions::from_env`]); a local folder never reads the environment.
pub fn load_model(
    source: &ModelSource,
    device: &Device,
) -> Result<(ModelConfig, Box<dyn Model>, Option<Tokenizer>)> {
    let files = match source {
        ModelSource::Path(_) => source.resolve(&HubOptions::with_cache_dir(""))?,
        ModelSource::Hub { .. } => source.resolve(&HubOptions::from_env()?)?,
    };
    load_files(&files, device)
}

/// [`load_model`] with an explicit cache (tests; a command-line cache option).
pub fn load_model_with(
    source: &ModelSource,
    opts: &HubOptions,
    device: &Device,
) -> Result<(ModelConfig, Box<dyn Model>, Option<Tokenizer>)> {
    load_files(&source.resolve(opts)?, device)
}
