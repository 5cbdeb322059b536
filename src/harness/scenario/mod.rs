//! Scenario files: parse (YAML, with line and column in every error), validate, and
//! expand a `matrix` into cases with stable, readable ids.
//!
//! A scenario file describes one experiment; `matrix` maps dotted field paths to lists
//! of values, and the cases are their cartesian product (first key varies slowest).
//!
//! This file holds the entry points ([`load`], [`parse`] and their `_with` forms), the
//! input limits and the load options. The rest, one job per file, all re-exported here:
//! - `schema.rs`: the types a scenario file deserialises into ([`Scenario`] and its
//!   sections, [`Expect`]) and the expanded [`Case`];
//! - `matrix.rs`: parsing and matrix expansion into cases ([`parse_with`]), and what a
//!   case hands the engine ([`Case::model_config`], [`Case::cache_config`], ...);
//! - `validate.rs`: the semantic checks types cannot express, including probes of the
//!   files a scenario names ([`validate`]);
//! - `paths.rs`: relative paths, their confinement to the scenario's folder
//!   ([`check_paths_inside`]) and scenario file discovery ([`discover`]);
//! - `errors.rs`: [`InputError`] and how a YAML/serde error becomes one (file, line,
//!   column, field, what was expected, "did you mean").

use std::path::Path;

mod errors;
mod matrix;
mod paths;
mod schema;
mod validate;

pub use errors::{suggest, InputError};
pub use matrix::{model_config, parse_with};
pub use paths::{check_paths_inside, discover, portable, slash};
pub use schema::{
    CacheModeName, CacheSpec, Case, Checks, DataSpec, Expect, ExpectedFailure, GenerateSpec,
    LossCheck, ModelSpec, PaddingCheck, PaddingSide, Platform, PlatformExpect, PrefixSpec,
    QuantizationCheck, Scenario,
};
pub use validate::validate;

/// Largest number of cases one file may expand to.
pub const MAX_CASES_PER_FILE: usize = 4096;
/// Largest value accepted for any size in a scenario (tokens, rows, window, ...):
/// far above anything a CPU run can hold; the memory guard refuses big cases.
pub const MAX_SIZE: usize = 1 << 24;
/// Longest scenario `name`, in characters: case ids, snapshot file names and report
/// rows start with it.
pub const MAX_NAME_CHARS: usize = 100;
/// Largest scenario file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most YAML nodes one scenario file may hold, aliases counted expanded (the shipped
/// 150-case grid has about 60): a billion-laughs file is refused after this many.
pub const MAX_YAML_NODES: usize = 20_000;
/// Deepest YAML nesting accepted (real scenarios nest 4 levels).
pub const MAX_YAML_DEPTH: usize = 32;

/// How scenario files are loaded.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Let relative paths (`data.file`, `prefix.adapter`, `tokenizer`) point outside the
    /// scenario's folder (`--allow-outside-paths`). Off by default: bug-report files
    /// come from strangers.
    pub allow_outside_paths: bool,
}

/// Read, parse and expand one scenario file.
pub fn load(path: &Path) -> Result<Vec<Case>, InputError> {
    load_with(path, LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Vec<Case>, InputError> {
    let err = |field: &str, message: String| InputError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: field.to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err("", format!("cannot read the file: {e}")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(err(
            "",
            format!(
                "the file has {} bytes; scenario files are limited to {MAX_FILE_BYTES}",
                bytes.len()
            ),
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| err("", format!("not UTF-8 text: {e}")))?;
    parse_with(path, &text, opts)
}

/// Parse and expand scenario text (`path` is used in errors and to resolve files).
pub fn parse(path: &Path, text: &str) -> Result<Vec<Case>, InputError> {
    parse_with(path, text, LoadOptions::default())
}
