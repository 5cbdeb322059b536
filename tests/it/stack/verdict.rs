//! The verdict's comparisons one by one, at their tolerances' edges: training losses,
//! the prompt's logits, greedy tokens, cache shapes, and two failures against each
//! other (`same_failure`, `diagnose`). Written against the mutants of
//! `src/harness/stack/verdict.rs` that the tests in `stack.rs` let through
//! (ci/mutants.md).

use super::{case, engine, ok_stack};
use crate::common::assert_contains;
use prefix_harness::engine::diagnosis::{Attention, Diagnosis, DiagnosisClass, TensorKind};
use prefix_harness::engine::generate::Strategy;
use prefix_harness::engine::trace::{CacheOp, CacheShapes};
use prefix_harness::harness::run::{run_case, CaseResult, LogitsSummary};
use prefix_harness::harness::scenario::{self, CacheModeName, Case};
use prefix_harness::harness::stack::{
    diagnose, loss_tolerance, same_failure, verdict, Divergence, Phase, StackCase, StackEnv,
    StackError, StackEvent, StackOutcome, TrainPhase, VerdictKind, LOGITS_ATOL, LOGITS_RTOL,
};
use std::path::Path;

fn judge(c: &Case, r: &CaseResult, s: &StackCase) -> StackOutcome {
    verdict(c, r, r.raised, s, &StackEnv::default())
}

fn err(kind: &str, msg: &str) -> StackError {
    StackError {
        kind: kind.into(),
        message: msg.into(),
        file: Some("transformers/cache_utils.py".into()),
        line: Some(447),
        function: Some("update".into()),
    }
}

/// A failed self-attention update at `layer` with keys and values `written` over `held`.
fn failed_update(layer: usize, held: Vec<usize>, written: Vec<usize>) -> StackEvent {
    StackEvent {
        step: 0,
        layer,
        attention: "self".into(),
        op: "update".into(),
        shapes: CacheShapes {
            key_before: Some(held.clone()),
            value_before: Some(held),
            key_written: Some(written.clone()),
            value_written: Some(written),
            ..CacheShapes::default()
        },
        failed: true,
    }
}

/// A stack whose forward raised `e` after `events`.
fn failing_stack(e: StackError, events: Vec<StackEvent>) -> StackCase {
    let mut s = ok_stack("x", vec![]);
    s.phases.forward = Some(Phase {
        error: Some(e),
        events,
        ..Default::default()
    });
    s
}

// ---------------------------------------------------------------------------------
// Training losses

#[test]
fn the_loss_tolerance_starts_at_1e_4_and_grows_2e_4_a_step() {
    assert_eq!(loss_tolerance(0), 1e-4);
    assert_eq!(loss_tolerance(1), 1e-4 + 2e-4);
    assert_eq!(loss_tolerance(10), 1e-4 + 2e-4 * 10.0);
}

/// A stack that ran with the engine's tokens, took 12.5 ms and trained with `losses`.
fn with_losses(r: &CaseResult, losses: Vec<f64>) -> StackCase {
    let mut s = ok_stack("x", r.tokens.clone());
    s.duration_ms = 12.5;
    s.phases.train = Some(TrainPhase {
        losses,
        ..Default::default()
    });
    s
}

#[test]
fn training_losses_agree_within_the_step_tolerance_and_diverge_beyond_it() {
    let c = case("scenarios/stack/train-adamw.yaml");
    let r = engine(&c);
    assert_eq!(r.losses.len(), 10);
    let exact: Vec<f64> = r.losses.iter().map(|&l| f64::from(l)).collect();
    // The same losses: agree, and the outcome carries the stack's losses and time.
    let o = judge(&c, &r, &with_losses(&r, exact.clone()));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert!(o.detail.starts_with("10 losses"), "{}", o.detail);
    assert_eq!(o.losses, exact);
    assert_eq!(o.duration_ms, 12.5);
    // Step 3 moved by 0.9 and 1.1 of its bound (losses > 1: relative to the loss).
    let moved = |f: f64| {
        let mut l = exact.clone();
        l[3] += f * loss_tolerance(3) * l[3];
        l
    };
    let o = judge(&c, &r, &with_losses(&r, moved(0.9)));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    let o = judge(&c, &r, &with_losses(&r, moved(1.1)));
    assert_eq!(
        (o.verdict, o.divergence),
        (VerdictKind::Diverges, Some(Divergence::Loss))
    );
    assert!(
        o.detail.starts_with("training loss at step 3: engine"),
        "{}",
        o.detail
    );
    // One loss more on the stack: the counts differ.
    let mut longer = exact.clone();
    longer.push(exact[9]);
    let o = judge(&c, &r, &with_losses(&r, longer));
    assert_eq!(o.divergence, Some(Divergence::Loss), "{}", o.detail);
    assert_eq!(
        o.detail,
        "10 training losses on the engine, 11 on the stack"
    );
}

#[test]
fn a_loss_difference_exactly_at_the_bound_agrees() {
    // Losses below 1 are compared absolutely: |0 - 1e-4| is the bound at step 0.
    let c = case("scenarios/stack/train-adamw.yaml");
    let mut r = engine(&c);
    r.losses = vec![0.0];
    let o = judge(&c, &r, &with_losses(&r, vec![loss_tolerance(0)]));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    let o = judge(&c, &r, &with_losses(&r, vec![loss_tolerance(0) * 1.01]));
    assert_eq!(o.divergence, Some(Divergence::Loss), "{}", o.detail);
}

#[test]
fn trained_cases_compare_no_tokens_and_sampled_cases_no_greedy_tokens() {
    // Trained: the tokens of a trained prefix depend on rounding.
    let c = case("scenarios/stack/train-adamw.yaml");
    let r = engine(&c);
    let exact: Vec<f64> = r.losses.iter().map(|&l| f64::from(l)).collect();
    let mut s = with_losses(&r, exact);
    let other: Vec<Vec<u32>> = r
        .tokens
        .iter()
        .map(|row| row.iter().map(|t| (t + 1) % 256).collect())
        .collect();
    s.phases.recompute.as_mut().unwrap().tokens = Some(other.clone());
    s.phases.generate.as_mut().unwrap().tokens = Some(other.clone());
    let o = judge(&c, &r, &s);
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    // Sampled, untrained: the stack's draws are torch's.
    let mut c = case("scenarios/stack/peft-2192.yaml");
    c.scenario.generate.strategy = Strategy::Sample {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: 3,
    };
    let r = engine(&c);
    let o = judge(&c, &r, &ok_stack(&c.id, other));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert_eq!(o.detail, "both run");
}

// ---------------------------------------------------------------------------------
// Logits

fn flat_summary(x: f64) -> LogitsSummary {
    LogitsSummary {
        min: x,
        q25: x,
        median: x,
        q75: x,
        max: x,
        sum: x,
    }
}

/// The stack's last-position logits as one row `[1, 5]` of `x`.
fn with_logits(r: &CaseResult, x: f64) -> StackCase {
    let mut s = ok_stack("x", r.tokens.clone());
    s.phases.forward = Some(Phase {
        logits_last: Some(vec![vec![x; 5]]),
        ..Default::default()
    });
    s
}

#[test]
fn logits_agree_up_to_atol_plus_rtol_of_the_larger_and_not_beyond() {
    let c = case("scenarios/stack/peft-2192.yaml");
    let mut r = engine(&c);
    // Around 5: the bound is 1e-4 + 1e-4 * 5 = 6e-4.
    r.logits = vec![flat_summary(5.0)];
    let bound = LOGITS_ATOL + LOGITS_RTOL * 5.0;
    let o = judge(&c, &r, &with_logits(&r, 5.0 - 0.9 * bound));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert!(o.detail.starts_with("logits within"), "{}", o.detail);
    let o = judge(&c, &r, &with_logits(&r, 5.0 - 1.1 * bound));
    assert_eq!(o.divergence, Some(Divergence::Logits), "{}", o.detail);
    // Exactly at the bound: 0 against b with b = 1e-4 + 1e-4 b.
    r.logits = vec![flat_summary(0.0)];
    let b = 1e-4 / (1.0 - 1e-4);
    assert_eq!(
        b,
        LOGITS_ATOL + LOGITS_RTOL * b,
        "b is exactly on the bound"
    );
    let o = judge(&c, &r, &with_logits(&r, b));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert_eq!(o.logits_max_diff, Some(b));
}

// ---------------------------------------------------------------------------------
// Cache shapes

/// The stack's cached-decoding events copied from the engine's self-attention updates
/// (`key_after` := what the engine compares: `key_read`, or `key_after` for `hybrid`).
fn events_like_the_engine(r: &CaseResult, hybrid: bool) -> Vec<StackEvent> {
    r.trace
        .as_ref()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.op == CacheOp::Update && e.attention == Attention::SelfAttn)
        .map(|e| StackEvent {
            step: e.step,
            layer: e.layer,
            attention: "self".into(),
            op: "update".into(),
            shapes: CacheShapes {
                key_after: if hybrid {
                    e.shapes.key_after.clone()
                } else {
                    e.key_read.clone()
                },
                ..CacheShapes::default()
            },
            failed: false,
        })
        .collect()
}

fn with_cached_events(r: &CaseResult, events: Vec<StackEvent>) -> StackCase {
    let mut s = ok_stack("x", r.tokens.clone());
    s.phases.cached = Some(Phase {
        events,
        ..Default::default()
    });
    s
}

#[test]
fn cache_shapes_are_compared_event_by_event_in_the_dynamic_mode() {
    let c = case("scenarios/stack/peft-2192.yaml");
    assert_eq!(c.scenario.cache.mode, CacheModeName::Dynamic);
    let r = engine(&c);
    let same = events_like_the_engine(&r, false);
    // 2 layers x 4 steps.
    assert_eq!(same.len(), 8);
    let o = judge(&c, &r, &with_cached_events(&r, same.clone()));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert!(o.detail.ends_with(", 8 cache events"), "{}", o.detail);
    // Seeds and cross-attention events of the stack are not updates of self-attention.
    let mut extra = same.clone();
    let mut seed = same[0].clone();
    seed.op = "seed".into();
    seed.shapes.key_after = Some(vec![9, 9, 9]);
    let mut cross = same[0].clone();
    cross.attention = "cross".into();
    cross.shapes.key_after = Some(vec![9, 9, 9]);
    extra.insert(0, seed);
    extra.insert(1, cross);
    let o = judge(&c, &r, &with_cached_events(&r, extra));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    // One shape off: the first differing event, by index, step and layer.
    let mut off = same.clone();
    off[3].shapes.key_after.as_mut().unwrap()[2] += 1;
    let o = judge(&c, &r, &with_cached_events(&r, off));
    assert_eq!(o.divergence, Some(Divergence::Events), "{}", o.detail);
    assert!(
        o.detail.starts_with(&format!(
            "cache event 3 (self-attention updates): engine step {} layer {}",
            same[3].step, same[3].layer
        )),
        "{}",
        o.detail
    );
    // Another layer at the same shape is a difference too.
    let mut moved = same.clone();
    moved[0].layer += 1;
    let o = judge(&c, &r, &with_cached_events(&r, moved));
    assert_eq!(o.divergence, Some(Divergence::Events), "{}", o.detail);
    // One event fewer on the stack.
    let o = judge(&c, &r, &with_cached_events(&r, same[..7].to_vec()));
    assert_eq!(
        o.detail,
        "8 self-attention cache updates on the engine, 7 on the stack"
    );
    // No events: nothing to compare, and no "cache events" in the detail.
    let o = judge(&c, &r, &with_cached_events(&r, vec![]));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    assert!(!o.detail.contains("cache events"), "{}", o.detail);
}

#[test]
fn other_modes_store_by_design_differently_and_their_shapes_are_not_compared() {
    let mut c = case("scenarios/stack/peft-2192.yaml");
    c.scenario.cache.mode = CacheModeName::Static;
    c.scenario.cache.max_len = Some(64);
    let r = engine(&c);
    let mut off = events_like_the_engine(&r, false);
    off[0].shapes.key_after = Some(vec![1, 2, 3, 4]);
    let o = judge(&c, &r, &with_cached_events(&r, off));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
}

#[test]
fn a_hybrid_cache_compares_the_stored_shapes() {
    let c = scenario::load(Path::new("scenarios/stack/gemma3.yaml"))
        .unwrap()
        .into_iter()
        .find(|k| k.scenario.cache.mode == CacheModeName::Hybrid)
        .expect("a hybrid case");
    assert_eq!(c.scenario.cache.mode, CacheModeName::Hybrid);
    let r = engine(&c);
    let stored = events_like_the_engine(&r, true);
    let read = events_like_the_engine(&r, false);
    assert_ne!(
        stored, read,
        "a sliding layer stores fewer keys than it reads"
    );
    let o = judge(&c, &r, &with_cached_events(&r, stored));
    assert_eq!(o.verdict, VerdictKind::Agree, "{}", o.detail);
    let o = judge(&c, &r, &with_cached_events(&r, read));
    assert_eq!(o.divergence, Some(Divergence::Events), "{}", o.detail);
}

// ---------------------------------------------------------------------------------
// Two failures

#[test]
fn both_failing_differently_diverges_and_a_bare_engine_error_is_not_the_same_failure() {
    // The engine's historical switch: rank at layer 0 self key.
    let buggy = case("scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml");
    let r = run_case(&buggy);
    assert!(r.raised);
    assert_eq!(r.diagnosis.as_ref().unwrap().class, DiagnosisClass::Rank);
    // The stack: head-dim at layer 1.
    let head_dim = failing_stack(
        err(
            "RuntimeError",
            "Sizes of tensors must match except in dimension 2. Expected size 8 but got size 4",
        ),
        vec![failed_update(1, vec![2, 4, 3, 8], vec![2, 4, 1, 4])],
    );
    let o = judge(&buggy, &r, &head_dim);
    assert_eq!(
        (o.verdict, o.divergence),
        (VerdictKind::Diverges, Some(Divergence::Failure))
    );
    assert!(
        o.detail.starts_with(
            "both fail, differently: engine rank at layer 0 self key, stack head-dim at layer 1 self key"
        ),
        "{}",
        o.detail
    );
    // An engine failure without a diagnosis (a message only) is not the stack's.
    let mut bare = r.clone();
    bare.diagnosis = None;
    bare.message = Some("engine gave up".into());
    let o = judge(&buggy, &bare, &head_dim);
    assert_eq!(o.divergence, Some(Divergence::Failure), "{}", o.detail);
    assert!(
        o.detail
            .starts_with("both fail: engine `engine gave up`, stack head-dim"),
        "{}",
        o.detail
    );
}

fn diag(class: DiagnosisClass) -> Diagnosis {
    Diagnosis::new(class, "m")
}

#[test]
fn same_failure_needs_the_class_and_every_place_both_name() {
    let full = |layer, attention, tensor| diag(DiagnosisClass::Rank).at(layer, attention, tensor);
    let a = full(0, Attention::SelfAttn, TensorKind::Key);
    assert!(same_failure(&a, &a.clone()));
    assert!(!same_failure(&a, &diag(DiagnosisClass::SeqLen)));
    assert!(!same_failure(&diag(DiagnosisClass::SeqLen), &a));
    // Each place differing while both name it.
    for b in [
        full(1, Attention::SelfAttn, TensorKind::Key),
        full(0, Attention::Cross, TensorKind::Key),
        full(0, Attention::SelfAttn, TensorKind::Value),
    ] {
        assert!(!same_failure(&a, &b), "{} vs {}", a.place(), b.place());
        assert!(!same_failure(&b, &a), "{} vs {}", b.place(), a.place());
    }
    // A place one side does not name matches anything, on either side.
    let unplaced = diag(DiagnosisClass::Rank);
    assert!(same_failure(&a, &unplaced));
    assert!(same_failure(&unplaced, &a));
    for field in 0..3 {
        let mut b = full(5, Attention::Cross, TensorKind::Value);
        let mut a = a.clone();
        match field {
            0 => {
                b.attention = a.attention;
                b.tensor = a.tensor;
                b.layer = None;
            }
            1 => {
                b.layer = a.layer;
                b.tensor = a.tensor;
                b.attention = None;
            }
            _ => {
                b.layer = a.layer;
                b.attention = a.attention;
                b.tensor = None;
            }
        }
        assert!(same_failure(&a, &b), "field {field} unnamed on the right");
        assert!(same_failure(&b, &a), "field {field} unnamed on the left");
        // Named on the right only, with a different value on the left: still differs
        // in the fields both name.
        match field {
            0 => a.attention = Some(Attention::Cross),
            1 => a.tensor = Some(TensorKind::Value),
            _ => a.layer = Some(5),
        }
        assert!(
            !same_failure(&a, &b),
            "field {field}: another field differs"
        );
    }
}

#[test]
fn the_stacks_message_keeps_the_file_and_line_and_the_hint_says_who_raised() {
    let e = err(
        "RuntimeError",
        "Tensors must have same number of dimensions: got 3 and 4",
    );
    let d = diagnose(&e, &[failed_update(0, vec![8, 8, 8], vec![2, 4, 5, 8])]);
    assert_eq!(
        d.message,
        "RuntimeError: Tensors must have same number of dimensions: got 3 and 4 at transformers/cache_utils.py:447"
    );
    assert_contains(&d.hint, "shapes are the tensor written");
    let mut nowhere = e.clone();
    nowhere.line = None;
    assert!(!diagnose(&nowhere, &[]).message.contains(" at "));
    let d = diagnose(&err("KeyError", "'cache_position'"), &[]);
    assert_eq!(d.class, DiagnosisClass::Exception);
    assert!(d.hint.contains("the Python stack's own code"), "{}", d.hint);
}

#[test]
fn a_value_mismatch_reports_the_value_shapes_and_a_batch_mismatch_is_batch() {
    let cat = "Sizes of tensors must match except in dimension 2. Expected size 8 but got size 12";
    let mut ev = failed_update(0, vec![2, 4, 3, 8], vec![2, 4, 1, 8]);
    ev.shapes.value_written = Some(vec![2, 2, 1, 8]);
    let d = diagnose(&err("RuntimeError", cat), &[ev]);
    assert_eq!(
        (d.class, d.tensor),
        (DiagnosisClass::KvHeads, Some(TensorKind::Value))
    );
    assert_eq!(
        (d.expected_shape, d.actual_shape),
        (vec![2, 2, 1, 8], vec![2, 4, 3, 8])
    );
    let ev = failed_update(0, vec![2, 4, 3, 8], vec![3, 4, 1, 8]);
    let d = diagnose(&err("RuntimeError", cat), &[ev]);
    assert_eq!(
        (d.class, d.tensor),
        (DiagnosisClass::Batch, Some(TensorKind::Key))
    );
}

#[test]
fn outside_a_cache_update_only_a_size_mismatch_is_the_mask_width() {
    let d = diagnose(
        &err(
            "RuntimeError",
            "The expanded size of the tensor (12) must match the existing size (9) at non-singleton dimension 3",
        ),
        &[],
    );
    assert_eq!(d.class, DiagnosisClass::MaskWidth);
    let d = diagnose(
        &err(
            "RuntimeError",
            "shape '[2, 9]' is invalid for input at non-singleton dimension 3",
        ),
        &[],
    );
    assert_eq!(d.class, DiagnosisClass::Shape);
}
