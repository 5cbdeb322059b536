//! Expectations on the stack (`expect_stack`), chosen by the installed versions.

use serde::{Deserialize, Serialize};

use crate::harness::scenario::ExpectedFailure;

use super::{Divergence, StackEnv, StackOutcome, VerdictKind};

/// What a scenario expects of the stack: `agree` (default), `skip`, a failure
/// (`{error: CLASS, layer, attention, tensor}`: `stack-fails` with that diagnosis) or
/// `{diverges: tokens|generate|logits|loss|events|failure}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StackExpect {
    Word(StackWord),
    Diverges { diverges: Divergence },
    Error(ExpectedFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StackWord {
    Agree,
    Skip,
}

impl StackExpect {
    pub fn describe(&self) -> String {
        match self {
            StackExpect::Word(StackWord::Agree) => "agree".into(),
            StackExpect::Word(StackWord::Skip) => "skip".into(),
            StackExpect::Diverges { diverges } => format!(
                "diverges ({})",
                serde_json::to_value(diverges)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            StackExpect::Error(f) => format!(
                "stack-fails: {}",
                crate::harness::scenario::Expect::Error(f.clone()).describe()
            ),
        }
    }
}

/// One entry of `expect_stack`: an expectation for the stacks whose versions match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackExpectation {
    /// Package -> version range, e.g. `{transformers: ">=4.44,<4.47", peft: "<=0.12.0"}`;
    /// every range must hold. Packages: python, torch, transformers, peft, safetensors.
    #[serde(default)]
    pub when: std::collections::BTreeMap<String, String>,
    pub expect: StackExpect,
}

/// Packages a `when` may name. Besides them, `case: TEXT` holds for the cases whose id
/// contains TEXT (one expectation list for a whole matrix).
pub const PACKAGES: &[&str] = &["python", "torch", "transformers", "peft", "safetensors"];

/// Check the `expect_stack` entries of a scenario: packages known, ranges parseable.
pub fn validate_expectations(list: &[StackExpectation]) -> Result<(), (String, String)> {
    for (i, e) in list.iter().enumerate() {
        for (pkg, range) in &e.when {
            let field = format!("expect_stack[{i}].when.{pkg}");
            if pkg == "case" {
                continue;
            }
            if !PACKAGES.contains(&pkg.as_str()) {
                return Err((
                    field,
                    format!(
                        "unknown package; expected `case` or one of {}",
                        PACKAGES.join(", ")
                    ),
                ));
            }
            version_matches("0", range).map_err(|m| (field, m))?;
        }
    }
    Ok(())
}

/// The expectation for case `id` on `env`: the first entry whose `when` holds, else
/// `agree`.
pub fn expectation_for(list: &[StackExpectation], id: &str, env: &StackEnv) -> StackExpect {
    list.iter()
        .find(|e| {
            e.when.iter().all(|(pkg, range)| {
                if pkg == "case" {
                    return id.contains(range.as_str());
                }
                env.version(pkg)
                    .is_some_and(|v| version_matches(v, range).unwrap_or(false))
            })
        })
        .map(|e| e.expect.clone())
        .unwrap_or(StackExpect::Word(StackWord::Agree))
}

/// Whether the outcome meets the expectation: `None` when it does, else why not.
pub fn judge_stack(want: &StackExpect, o: &StackOutcome) -> Option<String> {
    let ok = match (want, o.verdict) {
        (StackExpect::Word(StackWord::Agree), VerdictKind::Agree) => true,
        (StackExpect::Word(StackWord::Skip), VerdictKind::Skip) => true,
        (StackExpect::Diverges { diverges }, VerdictKind::Diverges) => {
            o.divergence == Some(*diverges)
        }
        (StackExpect::Error(f), VerdictKind::StackFails | VerdictKind::Agree) => {
            o.diagnosis.as_ref().is_some_and(|d| {
                d.class == f.error
                    && f.layer.is_none_or(|l| d.layer == Some(l))
                    && f.attention.is_none_or(|a| d.attention == Some(a))
                    && f.tensor.is_none_or(|t| d.tensor == Some(t))
            })
        }
        _ => false,
    };
    if ok {
        return None;
    }
    let fixed = match want {
        StackExpect::Word(StackWord::Agree) => "",
        _ => " (fixed upstream? update the scenario's `expect_stack`)",
    };
    Some(format!(
        "stack: expected {}, got {}{fixed}",
        want.describe(),
        o.describe()
    ))
}

/// Does `version` satisfy `range`: comma-separated clauses `>=A`, `>A`, `<=A`, `<A`,
/// `==A`, `!=A` over dotted numbers (a local or pre-release suffix such as `+cu121`
/// or `rc1` is ignored). `Err` for a clause that is not of that form.
pub fn version_matches(version: &str, range: &str) -> Result<bool, String> {
    let v = numbers(version);
    let mut all = true;
    for clause in range.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let (op, rest) = ["<=", ">=", "==", "!=", "<", ">"]
            .iter()
            .find_map(|op| clause.strip_prefix(op).map(|r| (*op, r.trim())))
            .ok_or_else(|| {
                format!("`{clause}`: expected a comparison such as >=4.44, <0.13 or ==2.5.1")
            })?;
        if rest.is_empty() || !rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("`{clause}`: expected a version number after {op}"));
        }
        let w = numbers(rest);
        let ord = cmp_versions(&v, &w);
        use std::cmp::Ordering::*;
        let holds = match op {
            "<=" => ord != Greater,
            ">=" => ord != Less,
            "==" => ord == Equal,
            "!=" => ord != Equal,
            "<" => ord == Less,
            _ => ord == Greater,
        };
        all &= holds;
    }
    Ok(all)
}

fn numbers(v: &str) -> Vec<u64> {
    v.split(['+', '-'])
        .next()
        .unwrap_or("")
        .split('.')
        .map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect()
}

fn cmp_versions(a: &[u64], b: &[u64]) -> std::cmp::Ordering {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| a.get(i).unwrap_or(&0).cmp(b.get(i).unwrap_or(&0)))
        .find(|o| o.is_ne())
        .unwrap_or(std::cmp::Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::stack::diagnose;
    use crate::harness::stack::verdict::testing::{err, event};

    #[test]
    fn version_ranges() {
        assert!(version_matches("4.46.3", ">=4.44,<4.47").unwrap());
        assert!(!version_matches("4.47.0", ">=4.44,<4.47").unwrap());
        assert!(!version_matches("4.43.9", ">=4.44,<4.47").unwrap());
        assert!(version_matches("0.12.0", "<=0.12.0").unwrap());
        assert!(!version_matches("0.12.1", "<=0.12.0").unwrap());
        assert!(version_matches("2.5.1+cu121", "==2.5.1").unwrap());
        assert!(version_matches("5.24.0", ">4.99").unwrap());
        assert!(version_matches("0.21.2", "!=0.21.1").unwrap());
        assert!(!version_matches("0.21.2", "!=0.21.2").unwrap());
        assert!(
            version_matches("0.21.0", "!=0.21.2").unwrap(),
            "older is not equal either"
        );
        assert!(
            version_matches("4.44", ">=4.44.0").unwrap(),
            "missing parts count as 0"
        );
        assert!(version_matches("1.0", "4.44").is_err());
        assert!(version_matches("1.0", ">=x").is_err());
    }

    #[test]
    fn expectations_pick_the_first_matching_entry_and_judge_the_outcome() {
        let list: Vec<StackExpectation> = serde_json::from_str(
            r#"[{"when": {"transformers": ">=4.44,<4.47", "peft": "<=0.12.0"},
                 "expect": {"error": "rank", "layer": 0, "attention": "self", "tensor": "key"}},
                {"when": {"transformers": ">=5"}, "expect": {"diverges": "generate"}}]"#,
        )
        .unwrap();
        validate_expectations(&list).unwrap();
        let env = |t: &str, p: &str| StackEnv {
            transformers: Some(t.into()),
            peft: Some(p.into()),
            ..Default::default()
        };
        assert!(matches!(
            expectation_for(&list, "c", &env("4.46.3", "0.12.0")),
            StackExpect::Error(_)
        ));
        assert_eq!(
            expectation_for(&list, "c", &env("5.24.0", "0.21.2")),
            StackExpect::Diverges {
                diverges: Divergence::Generate
            }
        );
        assert_eq!(
            expectation_for(&list, "c", &env("4.46.3", "0.13.0")),
            StackExpect::Word(StackWord::Agree)
        );
        let by_case: Vec<StackExpectation> =
            serde_json::from_str(r#"[{"when": {"case": "cache=static"}, "expect": "skip"}]"#)
                .unwrap();
        validate_expectations(&by_case).unwrap();
        let any = StackEnv::default();
        assert_eq!(
            expectation_for(&by_case, "grid[cache=static]", &any),
            StackExpect::Word(StackWord::Skip)
        );
        assert_eq!(
            expectation_for(&by_case, "grid[cache=dynamic]", &any),
            StackExpect::Word(StackWord::Agree)
        );
        let bad: Vec<StackExpectation> =
            serde_json::from_str(r#"[{"when": {"numpy": ">=1"}, "expect": "agree"}]"#).unwrap();
        assert_eq!(
            validate_expectations(&bad).unwrap_err().0,
            "expect_stack[0].when.numpy"
        );

        let mut o = StackOutcome {
            diagnosis: Some(diagnose(
                &err("Tensors must have same number of dimensions: got 3 and 4"),
                &[event(0, vec![8, 16, 8], vec![2, 4, 5, 16])],
            )),
            ..StackOutcome::new(VerdictKind::StackFails, String::new(), StackEnv::default())
        };
        let rank = expectation_for(&list, "c", &env("4.46.3", "0.12.0"));
        assert_eq!(judge_stack(&rank, &o), None);
        let agree = StackExpect::Word(StackWord::Agree);
        let why = judge_stack(&agree, &o).expect("a failure is not agreement");
        assert!(
            !why.contains("fixed upstream"),
            "an expected agreement that fails is not a fixed bug: {why}"
        );
        let agreeing =
            StackOutcome::new(VerdictKind::Agree, "4 tokens".into(), StackEnv::default());
        assert_eq!(judge_stack(&agree, &agreeing), None, "agree meets agree");
        let skip = StackExpect::Word(StackWord::Skip);
        assert!(
            judge_stack(&skip, &agreeing).is_some(),
            "agree is not a skip"
        );
        let skipping = StackOutcome::new(
            VerdictKind::Skip,
            "no tuple caches".into(),
            StackEnv::default(),
        );
        assert_eq!(judge_stack(&skip, &skipping), None, "skip meets skip");
        assert!(
            judge_stack(&agree, &skipping).is_some(),
            "a skip is not agreement"
        );
        o.diagnosis.as_mut().unwrap().layer = Some(1);
        let why = judge_stack(&rank, &o).expect("another layer does not match");
        assert!(why.contains("fixed upstream?"), "{why}");
        o.verdict = VerdictKind::Diverges;
        o.divergence = Some(Divergence::Tokens);
        let gen = StackExpect::Diverges {
            diverges: Divergence::Generate,
        };
        assert!(judge_stack(&gen, &o).is_some(), "another divergence");
        o.divergence = Some(Divergence::Generate);
        assert_eq!(judge_stack(&gen, &o), None);
    }

    #[test]
    fn the_2192_pair_of_versions_is_warned_about() {
        let env = StackEnv {
            transformers: Some("4.46.3".into()),
            peft: Some("0.12.0".into()),
            ..Default::default()
        };
        assert_eq!(env.warnings().len(), 1);
        let env = StackEnv {
            transformers: Some("4.46.3".into()),
            peft: Some("0.13.0".into()),
            ..Default::default()
        };
        assert!(env.warnings().is_empty());
    }

    #[test]
    fn expectations_describe_themselves_as_the_table_shows_them() {
        let list: Vec<StackExpectation> = serde_json::from_str(
            r#"[{"expect": "agree"}, {"expect": "skip"}, {"expect": {"diverges": "generate"}},
                {"expect": {"error": "rank", "layer": 0, "attention": "self", "tensor": "key"}}]"#,
        )
        .unwrap();
        let text: Vec<String> = list.iter().map(|e| e.expect.describe()).collect();
        assert_eq!(
            text,
            [
                "agree",
                "skip",
                "diverges (generate)",
                "stack-fails: rank @ layer 0 self key"
            ]
        );
    }
}
