//! Where real models come from: a local Hugging Face folder (`model: {path: DIR}`) or a
//! Hub repository resolved from the LOCAL Hugging Face cache (`model: {hub: org/name,
//! revision: main}`), and loading them into the engine.
//!
//! # Sources
//!
//! - [`ModelSource::Path`]: a folder as `save_pretrained` writes it: `config.json`,
//!   `model.safetensors` (or the shards named by `model.safetensors.index.json`), and
//!   optionally `tokenizer.json`.
//! - [`ModelSource::Hub`]: a repository id and revision (branch, tag or commit hash),
//!   looked up with `hf-hub` 0.4 (`default-features = false`: a pure-Rust reader of the
//!   cache, no network code) in the cache layout `huggingface_hub` writes:
//!
//!   ```text
//!   <cache>/models--org--name/refs/<revision>          the commit hash (no newline)
//!   <cache>/models--org--name/snapshots/<commit>/...    the files (links into blobs/)
//!   ```
//!
//!   Two cases hf-hub 0.4.3 does not handle are resolved here as `huggingface_hub`
//!   does: a revision that is itself a commit hash (no `refs/` entry, only
//!   `snapshots/<hash>/`), and a `refs/<revision>` file ending in a newline (hf-hub
//!   reads it untrimmed).
//!
//! # The cache folder and offline mode
//!
//! [`HubOptions::from_env`] finds the cache as `huggingface_hub` does:
//! `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (deprecated spelling), else
//! `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`. hf-hub itself only reads `HF_HOME` (and panics without a
//! home folder), so the lookup is done here ([`cache_dir_from`], a pure function of the
//! variables, tested without touching the process environment).
//!
//! This build NEVER downloads: it is always offline, whatever `HF_HUB_OFFLINE` says
//! ([`offline_from`] reads it the way `huggingface_hub` does, and errors mention it).
//! Downloading would sit behind a cargo feature `download` (hf-hub's `ureq` client with
//! `rustls-tls`, off by default so that the default build has no network or TLS stack);
//! that feature is NOT implemented. A repository that is not cached is an error that
//! names every path searched and how to fetch it (`huggingface-cli download org/name` on
//! a machine with network, then copy the `models--org--name` folder into the cache, or
//! pass the folder with `model: {path: DIR}`).
//!
//! # Loading
//!
//! [`load_model`] parses `config.json` with [`ModelConfig::from_hf_json`](crate::engine::model::ModelConfig::from_hf_json) (the family
//! comes from `model_type`; an unsupported one lists the supported families), reads
//! every safetensors file into memory with candle's safe loader
//! (`candle_core::safetensors::load_buffer`; no `unsafe` memory map: fine for the small
//! models a reproduction needs, a 7B checkpoint would need its size in RAM), builds the
//! model with `VarBuilder::from_tensors` (tensors are converted to f32), and reads
//! `tokenizer.json` when present. Missing files name the path; a truncated or corrupt
//! safetensors file is a clear error naming the file.

use std::fmt;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::engine::diagnosis::{EngineError, Result};

mod load;
pub use load::{
    load_files, load_files_recorded, load_model, load_model_with, load_weights, weight_files,
    Recorded,
};

/// The model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// Unsharded weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights (`{"weight_map": {tensor: shard file}}`).
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The optional tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Pickled PyTorch weights (not supported: only safetensors is read).
pub const PICKLE_WEIGHTS_FILE: &str = "pytorch_model.bin";
/// The revision used when a scenario names none.
pub const DEFAULT_REVISION: &str = "main";

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local Hugging Face folder (`model: {path: DIR}`).
    Path(PathBuf),
    /// A Hub repository in the local cache (`model: {hub: org/name, revision: REV}`).
    Hub { repo_id: String, revision: String },
}

impl ModelSource {
    /// A local folder.
    pub fn path(dir: impl Into<PathBuf>) -> Self {
        ModelSource::Path(dir.into())
    }

    /// A Hub repository (`revision` defaults to `main`), with the id and revision
    /// checked as `huggingface_hub` checks them (and so that they cannot leave the
    /// cache folder).
    pub fn hub(repo_id: &str, revision: Option<&str>) -> Result<Self> {
        validate_repo_id(repo_id)?;
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        validate_revision(revision)?;
        Ok(ModelSource::Hub {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Resolve to the files of the model: `config.json`, the safetensors weights (one
    /// file or the shards of the index) and `tokenizer.json` if present. `opts` is only
    /// read for [`ModelSource::Hub`].
    pub fn resolve(&self, opts: &HubOptions) -> Result<ModelFiles> {
        let dir = self.resolve_dir(opts, &[CONFIG_FILE])?;
        let weights = weight_files(&dir)?;
        let tokenizer = Some(dir.join(TOKENIZER_FILE)).filter(|p| p.is_file());
        Ok(ModelFiles {
            source: self.to_string(),
            config: dir.join(CONFIG_FILE),
            dir,
            weights,
            tokenizer,
        })
    }

    /// The folder holding this source's files (the snapshot folder for a Hub
    /// repository), after checking that every file in `required` is there. Usable for
    /// any repository, e.g. a PEFT adapter (`&["adapter_config.json"]`).
    pub fn resolve_dir(&self, opts: &HubOptions, required: &[&str]) -> Result<PathBuf> {
        match self {
            ModelSource::Path(dir) => {
                if !dir.exists() {
                    return Err(cfg_err(format!("model folder {} not found", dir.display())));
                }
                if !dir.is_dir() {
                    return Err(cfg_err(format!(
                        "{} is not a folder (expected a Hugging Face model folder with {CONFIG_FILE})",
                        dir.display()
                    )));
                }
                for f in required {
                    let p = dir.join(f);
                    if !p.is_file() {
                        return Err(cfg_err(format!(
                            "{}: no {f} in {} (found: {})",
                            p.display(),
                            dir.display(),
                            list_files(dir)
                        )));
                    }
                }
                Ok(dir.clone())
            }
            ModelSource::Hub { repo_id, revision } => {
                snapshot_dir(opts, repo_id, revision, required)
            }
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { repo_id, revision } => write!(f, "hub {repo_id}@{revision}"),
        }
    }
}

/// The files of a resolved model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The source, as shown in messages.
    pub source: String,
    /// The folder (the snapshot folder for a Hub repository).
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `model.safetensors`, or the shards of `model.safetensors.index.json` in order.
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

/// Where the local Hugging Face cache is, and the offline setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (the one holding `models--org--name/`).
    pub cache_dir: PathBuf,
    /// How `cache_dir` was chosen (`HF_HUB_CACHE`, `HF_HOME`, ...), for messages.
    pub cache_origin: String,
    /// `HF_HUB_OFFLINE` is set to a true value. This build never downloads anyway.
    pub offline_env: bool,
}

impl HubOptions {
    /// The cache of the process environment (see the module documentation).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The cache a given environment selects: `get(name)` returns a variable's value.
    /// Pure: tests pass a map instead of touching the (process-global) environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let (cache_dir, origin) = cache_dir_from(&get).ok_or_else(|| {
            cfg_err(
                "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, \
                 XDG_CACHE_HOME, HOME, USERPROFILE is set; set HF_HUB_CACHE to the cache folder"
                    .to_string(),
            )
        })?;
        Ok(Self {
            cache_dir,
            cache_origin: origin,
            offline_env: offline_from(&get),
        })
    }

    /// An explicit cache folder (tests, or a `--hf-cache` style option).
    pub fn with_cache_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: dir.into(),
            cache_origin: "an explicit option".to_string(),
            offline_env: false,
        }
    }

    /// Always `true`: this build has no download code (the `download` feature is not
    /// implemented), so only the local cache is read.
    pub fn offline(&self) -> bool {
        true
    }
}

/// The hub cache folder and how it was chosen, from environment variables as
/// `huggingface_hub` reads them: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`,
/// `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`, then `~/.cache/huggingface/hub`
/// with the home folder from `HOME` (or `USERPROFILE` on Windows). Empty values count
/// as unset; a leading `~` is expanded. `None` when nothing locates a cache.
pub fn cache_dir_from(get: &dyn Fn(&str) -> Option<String>) -> Option<(PathBuf, String)> {
    let var = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    let home = var("HOME")
        .or_else(|| var("USERPROFILE"))
        .map(PathBuf::from);
    let expand = |v: String| -> PathBuf {
        match (v.strip_prefix('~'), &home) {
            (Some(rest), Some(h)) if rest.is_empty() || rest.starts_with(['/', '\\']) => {
                h.join(rest.trim_start_matches(['/', '\\']))
            }
            _ => PathBuf::from(v),
        }
    };
    if let Some(v) = var("HF_HUB_CACHE") {
        return Some((expand(v), "HF_HUB_CACHE".into()));
    }
    if let Some(v) = var("HUGGINGFACE_HUB_CACHE") {
        return Some((expand(v), "HUGGINGFACE_HUB_CACHE".into()));
    }
    if let Some(v) = var("HF_HOME") {
        return Some((expand(v).join("hub"), "HF_HOME + /hub".into()));
    }
    if let Some(v) = var("XDG_CACHE_HOME") {
        return Some((
            expand(v).join("huggingface").join("hub"),
            "XDG_CACHE_HOME + /huggingface/hub".into(),
        ));
    }
    home.map(|h| {
        (
            h.join(".cache").join("huggingface").join("hub"),
            "the default ~/.cache/huggingface/hub".into(),
        )
    })
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it: true for `1`, `ON`, `YES`, `TRUE`
/// (any case).
pub fn offline_from(get: &dyn Fn(&str) -> Option<String>) -> bool {
    get("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        })
        .unwrap_or(false)
}

fn cfg_err(m: String) -> EngineError {
    EngineError::Config(m)
}

/// Repository ids as `huggingface_hub.utils.validate_repo_id` accepts them: `name` or
/// `org/name`, letters, digits, `-`, `_`, `.`, no `--` or `..`, at most 96 characters.
fn validate_repo_id(id: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(cfg_err(format!(
            "hub repository id `{id}` is invalid: {why} (expected `name` or `org/name`)"
        )))
    };
    if id.is_empty() || id.len() > 96 {
        return bad("it must have 1 to 96 characters");
    }
    if id.contains("--") || id.contains("..") {
        return bad("`--` and `..` are not allowed");
    }
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 {
        return bad("at most one `/`");
    }
    for p in parts {
        if p.is_empty() {
            return bad("empty part");
        }
        if !p
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if p.starts_with(['-', '.']) || p.ends_with(['-', '.']) {
            return bad("a part may not start or end with `-` or `.`");
        }
    }
    Ok(())
}

/// A revision is a branch, tag or commit hash; it becomes a path below `refs/`, so it
/// may not climb out of the cache.
fn validate_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && !rev.starts_with('/')
        && !rev.contains('\\')
        && !rev.chars().any(char::is_control)
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(cfg_err(format!(
            "hub revision `{rev}` is invalid (expected a branch, tag or commit hash)"
        )))
    }
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Names of the entries of `dir`, sorted, for messages.
fn list_files(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(", ")
    }
}

/// The snapshot folder of `repo_id` at `revision` in the cache of `opts`, holding every
/// file of `required`. hf-hub resolves the usual case; a commit-hash revision and a
/// newline-terminated ref are resolved here; anything else is the "not cached" error.
pub fn snapshot_dir(
    opts: &HubOptions,
    repo_id: &str,
    revision: &str,
    required: &[&str],
) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    validate_revision(revision)?;
    let cache = Cache::new(opts.cache_dir.clone());
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = opts.cache_dir.join(repo.folder_name());
    let ref_path = repo_dir.join("refs").join(revision);
    let first = required.first().copied().unwrap_or(CONFIG_FILE);

    // 1. hf-hub: refs/<revision> -> snapshots/<commit>/<file>.
    let via_hf_hub = cache
        .repo(repo.clone())
        .get(first)
        .and_then(|p| p.parent().map(Path::to_path_buf));

    // 2. What huggingface_hub also accepts: a trimmed ref, or a commit hash revision.
    let dir = match via_hf_hub {
        Some(d) => d,
        None => {
            let commit = match std::fs::read_to_string(&ref_path) {
                Ok(text) => Some(text.trim().to_string()),
                Err(_) if is_commit_hash(revision) => Some(revision.to_string()),
                Err(_) => None,
            };
            let snap = commit
                .as_deref()
                .filter(|c| !c.is_empty() && validate_revision(c).is_ok())
                .map(|c| repo_dir.join("snapshots").join(c));
            match snap {
                Some(s) if s.is_dir() => s,
                _ => {
                    return Err(not_cached(
                        opts,
                        repo_id,
                        revision,
                        &repo_dir,
                        &ref_path,
                        snap.as_deref(),
                        first,
                    ))
                }
            }
        }
    };
    for f in required {
        if !dir.join(f).is_file() {
            return Err(cfg_err(format!(
                "hub {repo_id}@{revision}: the cached snapshot {} has no {f} (found: {}); \
                 the download was partial or the repository has no such file: fetch it with \
                 `huggingface-cli download {repo_id} {f} --revision {revision}`",
                dir.display(),
                list_files(&dir)
            )));
        }
    }
    Ok(dir)
}

/// The error for a repository that is not in the cache: the paths searched, what is
/// there instead, and how to fetch it.
fn not_cached(
    opts: &HubOptions,
    repo_id: &str,
    revision: &str,
    repo_dir: &Path,
    ref_path: &Path,
    snapshot: Option<&Path>,
    file: &str,
) -> EngineError {
    let mut m = format!(
        "hub {repo_id}@{revision} is not in the local Hugging Face cache {} (from {}).\n\
         \x20 searched {} (the commit of `{revision}`), then {}\n",
        opts.cache_dir.display(),
        opts.cache_origin,
        ref_path.display(),
        repo_dir
            .join("snapshots")
            .join(if is_commit_hash(revision) {
                revision
            } else {
                "<commit>"
            })
            .join(file)
            .display()
    );
    if !opts.cache_dir.is_dir() {
        m.push_str(&format!(
            "  the cache folder {} does not exist\n",
            opts.cache_dir.display()
        ));
    } else if !repo_dir.is_dir() {
        m.push_str(&format!(
            "  {} does not exist: nothing of {repo_id} is cached\n",
            repo_dir.display()
        ));
    } else {
        match (ref_path.is_file(), snapshot) {
            (true, Some(s)) => m.push_str(&format!(
                "  {} names a snapshot that is missing: {} (a partial or moved cache)\n",
                ref_path.display(),
                s.display()
            )),
            (true, None) => m.push_str(&format!(
                "  {} does not hold a commit hash\n",
                ref_path.display()
            )),
            (false, Some(s)) => {
                m.push_str(&format!("  no such ref, and no snapshot {}\n", s.display()))
            }
            (false, None) => m.push_str("  no such ref\n"),
        }
        m.push_str(&format!(
            "  cached refs: {}; cached snapshots: {}\n",
            list_files(&repo_dir.join("refs")),
            list_files(&repo_dir.join("snapshots"))
        ));
    }
    m.push_str(&format!(
        "  this build never downloads (offline{}; downloading would need the cargo feature \
         `download`, not implemented).\n  To fetch it: on a machine with network run \
         `huggingface-cli download {repo_id} --revision {revision}` and copy its {} folder \
         into {} (or point HF_HUB_CACHE at a cache that has it), or pass the model folder \
         with `model: {{path: DIR}}`",
        if opts.offline_env {
            "; HF_HUB_OFFLINE is set"
        } else {
            ""
        },
        repo_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        opts.cache_dir.display()
    ));
    cfg_err(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
            ("HOME", "/home/u"),
        ];
        let pick = |n: usize| cache_dir_from(&env(&all[n..])).expect("a cache");
        assert_eq!(pick(0), (PathBuf::from("/a"), "HF_HUB_CACHE".into()));
        assert_eq!(pick(1).0, PathBuf::from("/b"));
        assert_eq!(pick(2).0, PathBuf::from("/c/hub"));
        assert_eq!(pick(3).0, PathBuf::from("/d/huggingface/hub"));
        assert_eq!(pick(4).0, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(cache_dir_from(&env(&[])), None);
        // Windows home; empty values count as unset; `~` expands.
        let win = [("HF_HUB_CACHE", " "), ("USERPROFILE", "C:/Users/u")];
        assert_eq!(
            cache_dir_from(&env(&win)).expect("cache").0,
            PathBuf::from("C:/Users/u/.cache/huggingface/hub")
        );
        let tilde = [("HF_HOME", "~/hf"), ("HOME", "/home/u")];
        assert_eq!(
            cache_dir_from(&env(&tilde)).expect("cache").0,
            PathBuf::from("/home/u/hf/hub")
        );
    }

    #[test]
    fn offline_variable_is_read_like_huggingface_hub() {
        for v in ["1", "true", "TRUE", "yes", "On"] {
            assert!(offline_from(&env(&[("HF_HUB_OFFLINE", v)])), "{v}");
        }
        for v in ["0", "false", "", "no"] {
            assert!(!offline_from(&env(&[("HF_HUB_OFFLINE", v)])), "{v}");
        }
        assert!(!offline_from(&env(&[])));
        let o = HubOptions::from_lookup(env(&[("HF_HUB_OFFLINE", "1"), ("HF_HOME", "/h")]))
            .expect("options");
        assert!(o.offline_env && o.offline());
        assert_eq!(o.cache_dir, PathBuf::from("/h/hub"));
        let err = HubOptions::from_lookup(env(&[])).expect_err("no cache");
        assert!(err.to_string().contains("HF_HUB_CACHE"), "{err}");
    }

    #[test]
    fn repo_ids_and_revisions_are_checked() {
        for ok in ["gpt2", "org/name", "a-b_c.d/e.f-1"] {
            assert!(ModelSource::hub(ok, None).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c", "../x", "a--b", "org/", "/name", "a b", "-a"] {
            assert!(ModelSource::hub(bad, None).is_err(), "{bad}");
        }
        for ok in ["main", "v1.0", "refs/pr/1", &"a".repeat(40)] {
            assert!(ModelSource::hub("o/n", Some(ok)).is_ok(), "{ok}");
        }
        for bad in ["", "../main", "/etc", "a/../b", "a\\b", "x\n"] {
            assert!(ModelSource::hub("o/n", Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            ModelSource::hub("o/n", None).expect("ok").to_string(),
            "hub o/n@main"
        );
    }
}
