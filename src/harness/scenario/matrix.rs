//! Matrix expansion: a scenario's text parsed (with the input budgets), its `matrix`
//! checked and expanded into one [`Case`] per point with a stable id, each case
//! confined and validated; and case -> config: what a case hands the engine (model,
//! prefix and cache configs, prompts, tokenizer, adapter, expectation).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::errors::{locate, yaml_error};
use super::paths::normalise_paths;
use super::validate::scenario_prompts;
use super::{
    check_paths_inside, portable, slash, suggest, validate, CacheModeName, Case, Expect,
    InputError, LoadOptions, ModelSpec, Platform, Scenario, MAX_CASES_PER_FILE, MAX_FILE_BYTES,
    MAX_YAML_DEPTH, MAX_YAML_NODES,
};
use crate::engine::cache::{CacheConfig, CacheMode};
use crate::engine::model::ModelConfig;
use crate::engine::prefix::PrefixConfig;

/// The parser's input budgets for scenario files (bug reports come from strangers).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = 4 * MAX_YAML_NODES;
    budget.max_depth = MAX_YAML_DEPTH;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_YAML_NODES;
    options
}

/// [`parse`](super::parse) with options.
pub fn parse_with(path: &Path, text: &str, opts: LoadOptions) -> Result<Vec<Case>, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // Typed parse first: unknown keys, wrong types and negative sizes get a line and column.
    if text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    }) {
        return Err(InputError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            field: String::new(),
            message: "the file holds no YAML document; a scenario needs at least `name`, `model` and `prefix`".into(),
        });
    }
    let base: Scenario = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(path, text, &e))?;
    let doc: Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(path, text, &e))?;
    let mut doc = doc;
    if let Value::Object(m) = &mut doc {
        m.remove("matrix");
    }
    let err = |field: &str, message: String| InputError {
        file: path.to_path_buf(),
        line: locate(text, field),
        column: None,
        field: field.to_string(),
        message,
    };
    // The matrix: every key a known field path, every value a non-empty list.
    let mut axes: Vec<(String, Vec<Value>)> = vec![];
    for (key, values) in &base.matrix {
        let field = format!("matrix.{key}");
        let Value::Array(list) = values else {
            return Err(err(&field, "expected a list of values".into()));
        };
        if list.is_empty() {
            return Err(err(&field, "expected at least one value".into()));
        }
        check_matrix_path(&doc, key).map_err(|m| err(&field, m))?;
        axes.push((key.clone(), list.clone()));
    }
    // Saturating: a matrix of many long axes must be refused, not overflow.
    let total: usize = axes
        .iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()))
        .unwrap_or(usize::MAX);
    if total > MAX_CASES_PER_FILE {
        return Err(err(
            "matrix",
            if total == usize::MAX {
                format!("the matrix expands to more than {} cases; at most {MAX_CASES_PER_FILE} are allowed per file", usize::MAX)
            } else {
                format!("the matrix expands to {total} cases; at most {MAX_CASES_PER_FILE} are allowed per file")
            },
        ));
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path.to_string_lossy().replace('\\', "/");
    let mut cases = Vec::with_capacity(total);
    for n in 0..total {
        // Odometer: the first axis varies slowest.
        let mut rem = n;
        let mut picks = vec![0; axes.len()];
        for (i, (_, vals)) in axes.iter().enumerate().rev() {
            picks[i] = rem % vals.len();
            rem /= vals.len();
        }
        let mut case_doc = doc.clone();
        let mut labels = vec![];
        for ((key, vals), pick) in axes.iter().zip(&picks) {
            set_path(&mut case_doc, key, vals[*pick].clone());
            labels.push(format!("{}={}", short_key(key), value_text(&vals[*pick])));
        }
        let scenario: Scenario = serde_json::from_value(case_doc).map_err(|e| {
            let key = axes
                .iter()
                .zip(&picks)
                .map(|((k, v), p)| format!("{k}={}", value_text(&v[*p])))
                .collect::<Vec<_>>()
                .join(", ");
            err(
                "matrix",
                format!("the case [{key}] is not a valid scenario: {e}"),
            )
        })?;
        let mut scenario = scenario;
        normalise_paths(&mut scenario);
        // Confinement first: validation probes the files a scenario names, and its
        // messages must never describe a folder the scenario may not reach.
        if !opts.allow_outside_paths {
            check_paths_inside(&scenario, &dir).map_err(|(field, m)| err(&field, m))?;
        }
        validate(&scenario, &dir).map_err(|(field, m)| {
            // A field a matrix axis sets (or lies inside, or contains): blame the axis
            // and name the case, not the base value the matrix replaced.
            let axis = axes.iter().map(|(k, _)| k).find(|k| {
                field == **k
                    || field.starts_with(&format!("{k}."))
                    || k.starts_with(&format!("{field}."))
            });
            match axis {
                Some(k) => err(
                    &format!("matrix.{k}"),
                    format!("the case [{}]: {m}", labels.join(",")),
                ),
                None => err(&field, m),
            }
        })?;
        let id = if labels.is_empty() {
            scenario.name.clone()
        } else {
            format!("{}[{}]", scenario.name, labels.join(","))
        };
        cases.push(Case {
            id,
            file: file.clone(),
            dir: dir.clone(),
            scenario,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for c in &cases {
        if !seen.insert(c.id.clone()) {
            return Err(err("matrix", format!("two cases share the id `{}`", c.id)));
        }
    }
    Ok(cases)
}

/// Short names of common matrix keys in case ids.
fn short_key(path: &str) -> String {
    match path {
        "cache.mode" => "cache".into(),
        "prefix.virtual_tokens" => "P".into(),
        "data.batch_size" => "B".into(),
        "model.family" => "family".into(),
        "generate.max_new_tokens" => "new".into(),
        other => other.rsplit('.').next().unwrap_or(other).to_string(),
    }
}

/// How a matrix value appears in a case id: scalars as written, mappings as their
/// values joined by `/` (`{mode: sliding, window: 16}` -> `sliding/16`).
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => m.values().map(value_text).collect::<Vec<_>>().join("/"),
        Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// Check that a matrix key names a field a scenario can have.
fn check_matrix_path(doc: &Value, key: &str) -> Result<(), String> {
    const TOP: &[&str] = &[
        "name",
        "description",
        "tags",
        "model",
        "prefix",
        "cache",
        "data",
        "generate",
        "train",
        "platforms",
        "expect",
    ];
    const SECTIONS: &[(&str, &[&str])] = &[
        (
            "model",
            &["family", "config", "seed", "path", "hub", "revision"],
        ),
        (
            "prefix",
            &[
                "virtual_tokens",
                "projection",
                "encoder_hidden_size",
                "init",
                "layout",
                "heads_from",
                "head_dim_from",
                "extend_mask",
                "cross",
                "seed",
            ],
        ),
        (
            "cache",
            &[
                "mode",
                "max_len",
                "window",
                "cross_prefix_marks_updated",
                "save_at",
                "ring_head_lost_on_load",
                "bits",
                "residual",
                "prefix_full_precision",
                "capacity_without_prefix",
            ],
        ),
        (
            "data",
            &[
                "prompts",
                "file",
                "batch_size",
                "max_prompt_len",
                "padding_side",
            ],
        ),
        (
            "generate",
            &[
                "strategy",
                "max_new_tokens",
                "eos_token_id",
                "pad_token_id",
                "num_return_sequences",
                "expand_prefix",
                "prefill_chunk",
                "chunk_mask",
                "mask_buffer_one_row",
                "merge_rows_at",
                "merge_fill_from_first_row",
            ],
        ),
        (
            "train",
            &[
                "steps",
                "lr",
                "weight_decay",
                "seed",
                "batch_size",
                "max_len",
                "evaluate",
            ],
        ),
    ];
    let parts: Vec<&str> = key.split('.').collect();
    if !TOP.contains(&parts[0]) {
        let hint = suggest(parts[0], TOP)
            .map(|s| format!(", did you mean `{s}`?"))
            .unwrap_or_default();
        return Err(format!("unknown field `{}`{hint}", parts[0]));
    }
    if parts.len() >= 2 {
        if let Some((_, fields)) = SECTIONS.iter().find(|(s, _)| *s == parts[0]) {
            // model.config.<anything> is checked when the case is built.
            if !fields.contains(&parts[1]) {
                let hint = suggest(parts[1], fields)
                    .map(|s| format!(", did you mean `{}.{s}`?", parts[0]))
                    .unwrap_or_default();
                return Err(format!("unknown field `{key}`{hint}"));
            }
            if parts.len() > 2 && !(parts[0] == "model" && parts[1] == "config") {
                return Err(format!("`{key}` is not a field path"));
            }
        }
    }
    let _ = doc;
    Ok(())
}

/// Set a dotted path in a JSON document, creating mappings on the way.
fn set_path(doc: &mut Value, key: &str, value: Value) {
    let mut cur = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        let m = cur.as_object_mut().expect("object");
        if i + 1 == parts.len() {
            m.insert(part.to_string(), value);
            return;
        }
        cur = m
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

/// The model config of a spec: the family's tiny config with the overrides applied.
/// (Checkpoint models read theirs from `config.json`: see [`Case::model_config`].)
pub fn model_config(spec: &ModelSpec) -> Result<ModelConfig, String> {
    let Some(family) = spec.family else {
        return Err("a checkpoint model's config comes from its config.json".into());
    };
    let tiny = ModelConfig::tiny(family);
    let mut v = serde_json::to_value(&tiny).map_err(|e| e.to_string())?;
    let Value::Object(m) = &mut v else {
        return Err("internal: config is not a mapping".into());
    };
    for (k, val) in &spec.config {
        if k == "family" || !m.contains_key(k) {
            let known: Vec<&str> = m
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "family")
                .collect();
            let hint = suggest(k, &known)
                .map(|s| format!(", did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(format!(
                "unknown {} config field `{k}`{hint} (fields: {})",
                family.name(),
                known.join(", ")
            ));
        }
        m.insert(k.clone(), val.clone());
    }
    serde_json::from_value(v).map_err(|e| format!("{}: {e}", family.name()))
}

impl Case {
    /// The model's config: the tiny family config with overrides, or the checkpoint's
    /// `config.json`.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        match self.scenario.model.source(&self.dir) {
            None => model_config(&self.scenario.model),
            Some(src) => {
                let files = src
                    .and_then(|s| s.resolve(&crate::io::hub::HubOptions::from_env()?))
                    .map_err(|e| e.to_string())?;
                let text = std::fs::read_to_string(&files.config)
                    .map_err(|e| format!("{}: {e}", slash(&files.config)))?;
                ModelConfig::from_hf_json(&text)
                    .map_err(|e| format!("{e} (in {})", slash(&files.config)))
            }
        }
    }

    pub fn prefix_config(&self) -> PrefixConfig {
        let p = &self.scenario.prefix;
        PrefixConfig {
            num_virtual_tokens: p.virtual_tokens,
            projection: p.projection,
            encoder_hidden_size: p.encoder_hidden_size,
            init: p.init,
            layout: p.layout,
            heads_from: p.heads_from,
            head_dim_from: p.head_dim_from,
            dtype: p.dtype,
            cross: p.cross,
            seed: p.seed,
        }
    }

    /// The cache config; `prompt_len` is the batch's prompt length and `p` the number
    /// of virtual tokens (from the adapter when there is one): together they size a
    /// static cache by default.
    pub fn cache_config(&self, prompt_len: usize, p: usize) -> CacheConfig {
        let c = &self.scenario.cache;
        let new = self.scenario.generate.max_new_tokens;
        let capacity = prompt_len + new + if c.capacity_without_prefix { 0 } else { p };
        let mode = match c.mode {
            CacheModeName::None => CacheMode::None,
            CacheModeName::Dynamic => CacheMode::Dynamic,
            CacheModeName::Static => CacheMode::Static {
                max_len: c.max_len.unwrap_or(capacity),
            },
            CacheModeName::Sliding => CacheMode::Sliding {
                window: c.window.unwrap_or(usize::MAX),
            },
            CacheModeName::Rotating => CacheMode::Rotating {
                window: c.window.unwrap_or(usize::MAX),
            },
            CacheModeName::Legacy => CacheMode::Legacy,
            CacheModeName::Hybrid => CacheMode::Hybrid {
                max_len: c.max_len.or(c.capacity_without_prefix.then_some(capacity)),
            },
            CacheModeName::Quantized => CacheMode::Quantized {
                bits: c.bits.unwrap_or(crate::engine::cache::quant::DEFAULT_BITS),
                residual: c
                    .residual
                    .unwrap_or(crate::engine::cache::quant::DEFAULT_RESIDUAL),
                prefix_full_precision: c.prefix_full_precision,
            },
        };
        let mut cfg = CacheConfig::new(mode);
        if c.window.is_some() {
            cfg.window = c.window;
        }
        cfg.cross_prefix_marks_updated = c.cross_prefix_marks_updated;
        cfg.ring_head_lost_on_load = c.ring_head_lost_on_load;
        cfg.chunk_mask = self.scenario.generate.chunk_mask;
        cfg
    }

    /// The prompts of the case: inline, from the data file, or built in.
    pub fn prompts(&self) -> std::io::Result<Vec<String>> {
        scenario_prompts(&self.scenario, &self.dir)
    }

    /// The tokenizer of the case: built in, or a `tokenizer.json` next to the scenario.
    pub fn tokenizer(&self) -> crate::engine::diagnosis::Result<crate::io::tokenizer::Tokenizer> {
        match self.scenario.tokenizer.as_deref() {
            None | Some("builtin") => crate::io::tokenizer::Tokenizer::builtin(),
            Some(f) => {
                crate::io::tokenizer::Tokenizer::from_file(self.dir.join(portable(Path::new(f))))
            }
        }
    }

    /// The adapter folder, resolved against the scenario's folder.
    pub fn adapter_dir(&self) -> Option<PathBuf> {
        self.scenario
            .prefix
            .adapter
            .as_ref()
            .map(|a| self.dir.join(portable(a)))
    }

    /// The expectation on this platform: `expect_on.<os>` when given, else `expect`.
    pub fn expect(&self) -> &Expect {
        Platform::current()
            .and_then(|p| self.scenario.expect_on.get(&p))
            .map(|e| &e.0)
            .unwrap_or(&self.scenario.expect)
    }

    /// Whether the case runs on this platform, and if not why.
    pub fn skip_reason(&self) -> Option<String> {
        let wanted = self.scenario.platforms.as_ref()?;
        match Platform::current() {
            Some(p) if wanted.contains(&p) => None,
            _ => Some(format!(
                "meant for {}; this is {}",
                wanted
                    .iter()
                    .map(Platform::name)
                    .collect::<Vec<_>>()
                    .join(", "),
                std::env::consts::OS
            )),
        }
    }
}
