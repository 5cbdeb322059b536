//! Paths a scenario names: written with `/` whatever the OS, confined to the
//! scenario's folder (symlinks and `..` resolved), and the discovery of scenario files
//! under folders and glob patterns.

use std::path::{Path, PathBuf};

use super::{InputError, Scenario};

/// Write every relative path with `/`, whatever separator the file used, so a
/// scenario serialises (snapshots, shrunk files, reports) the same on every OS.
pub(super) fn normalise_paths(s: &mut Scenario) {
    let fix = |p: &mut PathBuf| *p = PathBuf::from(p.to_string_lossy().replace('\\', "/"));
    if let Some(p) = s.data.file.as_mut() {
        fix(p);
    }
    if let Some(p) = s.prefix.adapter.as_mut() {
        fix(p);
    }
    if let Some(p) = s.model.path.as_mut() {
        fix(p);
    }
    if let Some(t) = s.tokenizer.as_mut() {
        *t = t.replace('\\', "/");
    }
}

/// Every path a scenario names must stay inside its folder (symlinks resolved first).
pub fn check_paths_inside(s: &Scenario, dir: &Path) -> Result<(), (String, String)> {
    let base = dir
        .canonicalize()
        .or_else(|_| std::env::current_dir())
        .unwrap_or_default();
    let mut named: Vec<(&str, PathBuf)> = vec![];
    if let Some(f) = &s.data.file {
        named.push(("data.file", f.clone()));
    }
    if let Some(a) = &s.prefix.adapter {
        named.push(("prefix.adapter", a.clone()));
    }
    if let Some(p) = &s.model.path {
        named.push(("model.path", p.clone()));
    }
    if let Some(t) = s.tokenizer.as_deref().filter(|t| *t != "builtin") {
        named.push(("tokenizer", PathBuf::from(t)));
    }
    for (field, p) in named {
        let full = dir.join(portable(&p));
        // Validation already checked that the file exists; resolve symlinks and `..`.
        let Ok(real) = full.canonicalize() else {
            continue;
        };
        if !real.starts_with(&base) {
            return Err((
                field.to_string(),
                format!(
                    "`{}` resolves to {}, outside the scenario's folder {}; pass --allow-outside-paths to allow it",
                    slash(&p),
                    slash(&real),
                    slash(&base)
                ),
            ));
        }
    }
    Ok(())
}

/// A relative path written in a scenario, with `/` or `\\` separators, for this OS.
pub fn portable(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let text = p.to_string_lossy();
    text.split(['/', '\\']).filter(|s| !s.is_empty()).collect()
}

/// A path for messages and reports: `/`-separated whatever the OS.
pub fn slash(p: &Path) -> String {
    p.to_string_lossy().replace('\\', "/")
}

/// Every scenario file under `paths` (files, folders searched recursively for
/// `.yaml`/`.yml`, or glob patterns), sorted, without duplicates.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, InputError> {
    let mut out = vec![];
    for p in paths {
        let s = p.to_string_lossy();
        if s.contains('*') || s.contains('?') || s.contains('[') {
            let entries = glob::glob(&s).map_err(|e| InputError {
                file: p.clone(),
                line: None,
                column: None,
                field: String::new(),
                message: format!("invalid glob pattern: {e}"),
            })?;
            let mut any = false;
            for entry in entries.flatten() {
                any = true;
                collect(&entry, &mut out);
            }
            if !any {
                return Err(not_found(p, "no file matches this pattern"));
            }
        } else if p.exists() {
            collect(p, &mut out);
        } else {
            return Err(not_found(p, "no such file or folder"));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn not_found(p: &Path, m: &str) -> InputError {
    InputError {
        file: p.to_path_buf(),
        line: None,
        column: None,
        field: String::new(),
        message: m.to_string(),
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries {
            collect(&e, out);
        }
    } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
        out.push(p.to_path_buf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A glob pattern gives the files it matches, sorted; one that matches nothing is
    /// an error naming the pattern. (Run from the repository root, as `cargo test` does.)
    #[test]
    fn a_glob_gives_its_matches_and_a_glob_matching_nothing_is_an_error() {
        let found = discover(&[PathBuf::from("scenarios/bugs/*.yaml")]).unwrap();
        assert!(found.len() > 5, "{found:?}");
        assert!(found.windows(2).all(|w| w[0] < w[1]));
        assert!(found
            .iter()
            .all(|f| f.starts_with("scenarios/bugs") && f.extension().unwrap() == "yaml"));
        let err = discover(&[PathBuf::from("scenarios/bugs/*.nothing")]).unwrap_err();
        assert_eq!(err.message, "no file matches this pattern");
        assert_eq!(err.file, PathBuf::from("scenarios/bugs/*.nothing"));
    }
}
