//! Input errors: [`InputError`] (file, line, column, field, message), and how a
//! YAML/serde error becomes one: the dotted field written at the error's line, what was
//! expected, the closest known name ("did you mean"), and the parser's budgets in words.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{MAX_YAML_DEPTH, MAX_YAML_NODES};

/// A problem with a scenario file: which file, where, which field, what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the field, e.g. `prefix.virtual_tokens` (empty when unknown).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}

/// The 1-based line where the last segment of `field` is written as a key, if it is
/// written exactly once.
pub(super) fn locate(text: &str, field: &str) -> Option<usize> {
    // Matrix keys are written whole (`prefix.virtual_tokens:` under `matrix:`).
    let key = match field.strip_prefix("matrix.") {
        Some(k) => k,
        None => field.rsplit('.').next()?,
    };
    if key.is_empty() {
        return None;
    }
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|(i, _)| i + 1)
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The closest candidate to `word` (edit distance at most 3), for "did you mean".
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= 3.min(word.len().max(1)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Turn a YAML/serde error into an input error with line, column, the dotted field
/// path written there, and, for an unknown field, the closest known one.
pub(super) fn yaml_error(path: &Path, text: &str, e: &serde_saphyr::Error) -> InputError {
    let loc = e.location();
    let (line, column) = (
        loc.map(|l| l.line() as usize),
        loc.map(|l| l.column() as usize),
    );
    let full = e.to_string();
    // "error: line L column C: MESSAGE" then a rendered snippet.
    let first = full.lines().next().unwrap_or("").trim();
    let mut message = match first
        .find(": ")
        .filter(|_| first.starts_with("error: line "))
    {
        Some(_) => first.splitn(3, ": ").nth(2).unwrap_or(first).to_string(),
        None => first.trim_start_matches("error: ").to_string(),
    };
    let mut field = line.map(|l| field_at(text, l)).unwrap_or_default();
    let inner = innermost(e);
    if let serde_saphyr::Error::Budget { breach, .. } = inner {
        message = budget_message(breach);
    } else if let serde_saphyr::Error::AliasReplayLimitExceeded { .. } = inner {
        message = budget_message(&serde_saphyr::budget::BudgetBreach::Nodes { nodes: 0 });
    } else if message.starts_with("multiple YAML documents detected") {
        message =
            "a scenario file holds one YAML document; a second one starts here (`---`)".into();
        field.clear();
    } else if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        message = format!("duplicate key `{key}`");
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        // The parser stops at a sibling key (or the section's own key at the top
        // level): name the missing field, not that one.
        let missing = rest.split('`').next().unwrap_or(rest);
        let parent = field.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        field = if parent.is_empty() {
            missing.to_string()
        } else {
            format!("{parent}.{missing}")
        };
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((unknown, expected)) = unknown_and_expected(rest) {
            if let Some(s) = suggest(unknown, &expected) {
                message = format!(
                    "unknown variant `{unknown}`, did you mean `{s}`? (expected one of: {})",
                    expected.join(", ")
                );
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((unknown, expected)) = unknown_and_expected(rest) {
            let hint = suggest(unknown, &expected)
                .map(|s| format!(", did you mean `{s}`?"))
                .unwrap_or_default();
            message = format!(
                "unknown field `{unknown}`{hint} (expected one of: {})",
                expected.join(", ")
            );
        }
    } else if message.starts_with("invalid u") || message.starts_with("invalid i") {
        let got = line
            .and_then(|l| text.lines().nth(l - 1))
            .and_then(|t| t.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default();
        message = format!("expected a non-negative whole number, got `{got}`");
    }
    let syntax = matches!(
        inner,
        serde_saphyr::Error::ExternalMessage { source, .. }
            if matches!(**source, serde_saphyr::localizer::ExternalMessageSource::Parser(_))
    );
    if let Some((l, c, open)) = line.filter(|_| syntax).and_then(|l| unclosed_flow(text, l)) {
        message += &format!(" (is the `{open}` opened at line {l} column {c} closed?)");
    }
    InputError {
        file: path.to_path_buf(),
        line,
        column,
        field,
        message,
    }
}

/// The rest of serde's "unknown field/variant `" message (`` x`, expected one of `a`, `b` ``
/// or `` x`, expected `a` ``): the unknown name and the names serde expected.
fn unknown_and_expected(rest: &str) -> Option<(&str, Vec<&str>)> {
    let (unknown, tail) = rest.split_once('`')?;
    let expected = tail
        .trim_start_matches(", expected one of ")
        .trim_start_matches(", expected ")
        .split(", ")
        .map(|s| s.trim_matches('`'))
        .filter(|s| !s.is_empty())
        .collect();
    Some((unknown, expected))
}

/// The error under snippet and alias wrappers.
fn innermost(e: &serde_saphyr::Error) -> &serde_saphyr::Error {
    match e.without_snippet() {
        serde_saphyr::Error::AliasError { error, .. } => innermost(error),
        other => other,
    }
}

/// What a budget breach means for a scenario author.
fn budget_message(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Nodes { .. } | B::Events { .. } | B::Aliases { .. } | B::AliasAnchorRatio { .. } => {
            format!(
                "the YAML expands to more than {MAX_YAML_NODES} nodes (aliases count expanded); scenario files are limited to {MAX_YAML_NODES}"
            )
        }
        B::Depth { .. } => format!(
            "the YAML nests deeper than {MAX_YAML_DEPTH} levels; scenario files are limited to {MAX_YAML_DEPTH}"
        ),
        B::Documents { .. } => "a scenario file holds one YAML document".into(),
        other => format!("the YAML is over a parser limit ({other:?})"),
    }
}

/// A flow collection (`[` or `{`) opened before 1-based `line` and still open at its
/// start: `(line, column, bracket)` of the opener. Quotes and comments are skipped.
fn unclosed_flow(text: &str, line: usize) -> Option<(usize, usize, char)> {
    let mut open: Vec<(usize, usize, char)> = vec![];
    for (i, l) in text.lines().enumerate().take(line.saturating_sub(1)) {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (j, ch) in l.chars().enumerate() {
            match (quote, ch) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') if prev == ' ' || "[{,:".contains(prev) => quote = Some(ch),
                (None, '#') if prev == ' ' || j == 0 => break,
                (None, '[' | '{') => open.push((i + 1, j + 1, ch)),
                (None, ']' | '}') => {
                    open.pop();
                }
                _ => {}
            }
            prev = ch;
        }
    }
    open.first().copied()
}

/// The dotted path of the key written on 1-based `line`, from indentation
/// (`prefix.virtual_tokens`); empty when the line holds no key.
fn field_at(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(target) = lines.get(line.wrapping_sub(1)) else {
        return String::new();
    };
    let key_of = |l: &str| -> Option<(usize, String)> {
        let indent = l.len() - l.trim_start().len();
        let t = l.trim_start().trim_start_matches("- ");
        let (k, _) = t.split_once(':')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('#') && !k.contains(' ')).then(|| (indent, k.to_string()))
    };
    let Some((mut indent, key)) = key_of(target) else {
        return String::new();
    };
    let mut path = vec![key];
    for l in lines[..line - 1].iter().rev() {
        if let Some((i, k)) = key_of(l) {
            if i < indent {
                path.push(k);
                indent = i;
                if i == 0 {
                    break;
                }
            }
        }
    }
    path.reverse();
    path.join(".")
}
