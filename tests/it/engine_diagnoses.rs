//! Shape failures become structured diagnoses naming the class, the layer, the tensor
//! and both shapes. Each test pairs a historical mistake with the diagnosis it must give.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode, ModelCache};
use prefix_harness::engine::diagnosis::{
    from_candle, Attention, Diagnosis, DiagnosisClass, EngineError, TensorKind,
};
use prefix_harness::engine::generate::{greedy, prepare_cache, DecodeOptions};
use prefix_harness::engine::model::Family;
use prefix_harness::engine::prefix::{
    HeadDimFrom, HeadsFrom, PrefixConfig, PrefixEncoder, PrefixLayout,
};

fn diagnose(family: Family, p: usize, opts: DecodeOptions, cfg: Option<PrefixConfig>) -> Diagnosis {
    let model = tiny_model(family);
    let prefix = match cfg {
        Some(c) => PrefixEncoder::new(&c, &model.geometry(), &Device::Cpu).expect("prefix"),
        None => prefix(model.as_ref(), p),
    };
    match greedy(model.as_ref(), Some(&prefix), &opts, &prompt(2, 5), None) {
        Ok(_) => panic!("{family:?}: expected a diagnosis, the run passed"),
        Err(EngineError::Shape(d)) => *d,
        Err(e) => panic!("{family:?}: expected a shape diagnosis, got {e}"),
    }
}

/// The diagnosis of the next forward pass, which must fail, over the prompt
/// `prompt(b, 5)` through a `dynamic` cache prepared for `batch` rows with `prefix` (or
/// `seed` called on the empty cache), all of its 4 + 5 positions visible.
fn failing_forward(
    family: Family,
    prefix: Option<&PrefixEncoder>,
    batch: usize,
    seed: impl FnOnce(&mut ModelCache),
    b: usize,
) -> Diagnosis {
    let model = tiny_model(family);
    let cfg = CacheConfig::new(CacheMode::Dynamic);
    let mut cache =
        prepare_cache(model.as_ref(), prefix, &cfg, PrefixLayout::Auto, batch).expect("cache");
    seed(&mut cache);
    let mask = Tensor::ones((b, 9), DType::F32, &Device::Cpu).unwrap(); // [B, P + S]
    cache.next_step();
    let err = pass(model.as_ref(), &prompt(b, 5), &mut cache, &mask, None)
        .expect_err("the forward pass fails");
    err.diagnosis().expect("diagnosed").clone()
}

fn opts(mode: CacheMode) -> DecodeOptions {
    DecodeOptions::new(CacheConfig::new(mode), 3)
}

/// [`opts`] with the prefix shaped for `layout`.
fn opts_with_layout(mode: CacheMode, layout: PrefixLayout) -> DecodeOptions {
    let mut o = opts(mode);
    o.layout = layout;
    o
}

/// The diagnosis of a `family` prefix of `p` shaped for `layout` in a cache in `mode`
/// that holds another layout: a rank failure at layer 0's self key.
fn layout_mismatch(family: Family, p: usize, mode: CacheMode, layout: PrefixLayout) -> Diagnosis {
    let d = diagnose(family, p, opts_with_layout(mode, layout), None);
    assert_layer0_self(&d, DiagnosisClass::Rank, TensorKind::Key);
    d
}

/// [`assert_place`] at layer 0's self-attention.
fn assert_layer0_self(d: &Diagnosis, class: DiagnosisClass, tensor: TensorKind) {
    assert_place(d, class, 0, Attention::SelfAttn, tensor);
}

fn assert_place(
    d: &Diagnosis,
    class: DiagnosisClass,
    layer: usize,
    attention: Attention,
    tensor: TensorKind,
) {
    assert_eq!(
        (d.class, d.layer, d.attention, d.tensor),
        (class, Some(layer), Some(attention), Some(tensor)),
        "{d}"
    );
    assert!(!d.hint.is_empty(), "a diagnosis names a likely cause: {d}");
}

/// PEFT issue 2192: a 3-D Bloom prefix meets transformers' 4-D dynamic cache.
#[test]
fn bloom_legacy_prefix_in_a_dynamic_cache_is_a_rank_failure_at_layer_0_key() {
    let d = layout_mismatch(
        Family::Bloom,
        4,
        CacheMode::Dynamic,
        PrefixLayout::BloomLegacy,
    );
    assert_eq!(d.expected_shape, vec![2, 4, 4, 16], "[B, H, P, D]");
    assert_eq!(d.actual_shape, vec![8, 16, 4], "[B*H, D, P]");
    assert!(d.message.contains("got 3 and 4"), "{}", d.message);
}

#[test]
fn bloom_legacy_prefix_in_the_legacy_cache_it_was_shaped_for_passes() {
    let model = tiny_model(Family::Bloom);
    let pre = prefix(model.as_ref(), 4);
    let o = opts_with_layout(CacheMode::Legacy, PrefixLayout::BloomLegacy);
    greedy(model.as_ref(), Some(&pre), &o, &prompt(2, 5), None).expect("matching layouts run");
}

#[test]
fn standard_prefix_in_a_bloom_legacy_cache_is_a_rank_failure() {
    let d = layout_mismatch(Family::Bloom, 4, CacheMode::Legacy, PrefixLayout::Standard);
    assert_eq!((d.expected_shape.len(), d.actual_shape.len()), (3, 4));
}

/// PEFT PR 2662: the fused GPT-BigCode prefix meets the 4-D cache of transformers >= 4.54.
#[test]
fn bigcode_fused_prefix_in_a_dynamic_cache_is_a_rank_failure() {
    let d = layout_mismatch(
        Family::GptBigcode,
        3,
        CacheMode::Dynamic,
        PrefixLayout::BigcodeFused,
    );
    assert_eq!(d.actual_shape, vec![2, 3, 32], "[B, P, 2*D]");
}

/// The diagnosis of a tiny Llama with a prefix of 4 whose config `mistake` gets wrong:
/// a `class` failure at layer 0's self key.
fn llama_prefix_config_mistake(mistake: fn(&mut PrefixConfig), class: DiagnosisClass) -> Diagnosis {
    let mut c = PrefixConfig::new(4);
    mistake(&mut c);
    let d = diagnose(Family::Llama, 4, opts(CacheMode::Dynamic), Some(c));
    assert_layer0_self(&d, class, TensorKind::Key);
    d
}

/// PEFT PR 1901: prefix heads from attention heads on a GQA model.
#[test]
fn gqa_prefix_built_with_attention_heads_is_a_kv_heads_failure() {
    let d = llama_prefix_config_mistake(
        |c| c.heads_from = HeadsFrom::AttentionHeads,
        DiagnosisClass::KvHeads,
    );
    assert_eq!(d.actual_shape[1], 4, "attention heads");
    assert_eq!(d.expected_shape[1], 2, "kv heads");
}

/// PEFT < 0.18 on Qwen3: head_dim taken as hidden / heads instead of the config's.
#[test]
fn prefix_head_dim_from_hidden_over_heads_is_a_head_dim_failure() {
    let d = llama_prefix_config_mistake(
        |c| c.head_dim_from = HeadDimFrom::HiddenOverHeads,
        DiagnosisClass::HeadDim,
    );
    assert_eq!((d.expected_shape[3], d.actual_shape[3]), (24, 16));
}

#[test]
fn mask_not_extended_by_the_prefix_is_a_mask_width_failure() {
    let mut o = opts(CacheMode::Dynamic);
    o.extend_mask = false;
    let d = diagnose(Family::Gpt2, 4, o, None);
    assert_layer0_self(&d, DiagnosisClass::MaskWidth, TensorKind::Mask);
    assert_eq!(
        (d.expected_shape.clone(), d.actual_shape.clone()),
        (vec![2, 9], vec![2, 5])
    );
    assert_contains(&d.hint, "not extended by the P prefix columns");
}

/// The other way round, a mask wider than the keys, gets the other hint.
#[test]
fn a_mask_wider_than_the_keys_is_a_mask_width_failure_with_its_own_hint() {
    use prefix_harness::engine::diagnosis::{Attention, EngineError};
    use prefix_harness::engine::model::attention::{additive_mask, MaskSpec};
    let pad =
        candle_core::Tensor::ones((2, 10), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(); // [B, T = 10]
    let spec = MaskSpec {
        q_start: 4,
        q_len: 5,
        kv_start: 0,
        kv_len: 9,
        causal: true,
        window: None,
    };
    let err = additive_mask(&pad, spec, 0, Attention::SelfAttn).unwrap_err();
    let EngineError::Shape(d) = err else {
        panic!("not a diagnosis: {err}")
    };
    assert_eq!(d.class, DiagnosisClass::MaskWidth);
    assert_eq!(
        (d.expected_shape.clone(), d.actual_shape.clone()),
        (vec![2, 9], vec![2, 10])
    );
    assert!(d.hint.contains("wider than the cache"), "{}", d.hint);
}

#[test]
fn static_cache_without_room_for_the_prefix_is_a_seq_len_failure() {
    // Sized for prompt (5) + new tokens (3) only: the 4 virtual tokens do not fit.
    let d = diagnose(
        Family::Gpt2,
        4,
        opts(CacheMode::Static { max_len: 8 }),
        None,
    );
    assert_layer0_self(&d, DiagnosisClass::SeqLen, TensorKind::Key);
}

/// The same in a hybrid cache (Gemma 2): a global layer sized for prompt + new tokens
/// only is a `seq-len` failure that names the hybrid cache's global layer and gives the
/// hybrid hint, not the static one.
#[test]
fn a_hybrid_cache_without_room_for_the_prefix_is_a_seq_len_failure_of_a_global_layer() {
    let d = diagnose(
        Family::Gemma2,
        4,
        opts(CacheMode::Hybrid { max_len: Some(8) }),
        None,
    );
    assert_eq!(d.class, DiagnosisClass::SeqLen, "{d}");
    assert_eq!(d.tensor, Some(TensorKind::Key), "{d}");
    assert_contains(
        &d.message,
        "the hybrid cache's global layer holds 8 positions",
    );
    assert_eq!(d.hint, prefix_harness::engine::cache::hybrid::CAPACITY_HINT);
}

#[test]
fn positions_past_the_learned_table_are_a_position_failure() {
    // tiny GPT-2 has 128 positions; 124 virtual tokens + 5 prompt tokens do not fit.
    let d = diagnose(Family::Gpt2, 124, opts(CacheMode::Dynamic), None);
    assert_layer0_self(&d, DiagnosisClass::Position, TensorKind::Positions);
}

/// UnifiedSKG issue 24: a prefix built for batch 1 used for a batch of 3 rows.
#[test]
fn prefix_built_for_another_batch_size_is_a_batch_failure() {
    let pre = prefix(tiny_model(Family::Llama).as_ref(), 4);
    let d = failing_forward(Family::Llama, Some(&pre), 1, |_| {}, 3);
    assert_layer0_self(&d, DiagnosisClass::Batch, TensorKind::Key);
}

#[test]
fn prefix_in_another_dtype_is_a_dtype_failure() {
    let pre = prefix(tiny_model(Family::Gpt2).as_ref(), 4);
    let f64_prefix = |cache: &mut ModelCache| {
        for (layer, lp) in pre.past_key_values(2).unwrap().iter().enumerate() {
            let (k, v) = (
                lp.key.to_dtype(DType::F64).unwrap(),
                lp.value.to_dtype(DType::F64).unwrap(),
            );
            cache.seed(layer, Attention::SelfAttn, k, v, 4).unwrap();
        }
    };
    let d = failing_forward(Family::Gpt2, None, 2, f64_prefix, 2);
    assert_layer0_self(&d, DiagnosisClass::Dtype, TensorKind::Key);
}

/// A candle error from an operation the engine did not pre-check still becomes a
/// diagnosis at the site it happened.
#[test]
fn candle_concat_errors_become_rank_diagnoses_at_their_site() {
    let a = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
    let err = Tensor::cat(&[&a, &b], 2).unwrap_err();
    let site = prefix_harness::engine::diagnosis::Site::new(1, Attention::Cross, TensorKind::Value);
    let e = from_candle(err, Some(site), "append");
    let d = e.diagnosis().expect("shape errors are diagnosed");
    assert_eq!(d.class, DiagnosisClass::Rank);
    assert_eq!(
        (d.layer, d.attention, d.tensor),
        (Some(1), Some(Attention::Cross), Some(TensorKind::Value))
    );
    // candle's orientation: the first operand's rank is the one expected.
    assert_eq!((d.expected_shape.len(), d.actual_shape.len()), (3, 4));
    assert_eq!(d.actual_shape, vec![2, 3, 4, 5]);
}

#[test]
fn diagnoses_read_as_one_line_with_place_shapes_and_cause() {
    let o = opts_with_layout(CacheMode::Dynamic, PrefixLayout::BloomLegacy);
    let text = diagnose(Family::Bloom, 4, o, None).to_string();
    assert!(text.starts_with("rank at layer 0 self key: "), "{text}");
    assert!(
        text.contains("expected [2, 4, 4, 16], rank 4; actual [8, 16, 4], rank 3"),
        "{text}"
    );
    assert!(text.contains("PEFT issue 2192"), "{text}");
}

/// The result of the one case of scenario `file` run with its expectation line `exact`
/// replaced by another (`exact` itself: the scenario as it is).
fn judged_with(
    file: &'static str,
    exact: &'static str,
) -> impl Fn(&str) -> prefix_harness::harness::run::CaseResult {
    use prefix_harness::harness::{run::run_case, scenario};
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains(exact),
        "the scenario's expectation changed: update this test"
    );
    move |expect| {
        let case = scenario::parse(std::path::Path::new(file), &text.replace(exact, expect))
            .unwrap()
            .remove(0);
        run_case(&case)
    }
}

/// The judge matches every place field of an expected failure, in both directions: the
/// exact place passes, and each field changed on its own (layer, attention, tensor, and
/// the class) fails with the expectation and the diagnosis in the message.
#[test]
fn the_judge_matches_every_place_field_of_an_expected_failure() {
    use prefix_harness::harness::run::{run_case, Status};
    use prefix_harness::harness::scenario;
    let file = "scenarios/bugs/t5-cross-cache-marked-computed.yaml";
    let exact = "expect: {error: seq-len, layer: 0, attention: cross, tensor: key}";
    let judge = judged_with(file, exact);
    assert_eq!(judge(exact).status, Status::Pass);
    assert_eq!(
        judge("expect: {error: seq-len}").status,
        Status::Pass,
        "no place: any place"
    );
    for other in [
        "expect: {error: seq-len, layer: 1, attention: cross, tensor: key}",
        "expect: {error: seq-len, layer: 0, attention: self, tensor: key}",
        "expect: {error: seq-len, layer: 0, attention: cross, tensor: value}",
        "expect: {error: seq-len, layer: 1}",
        "expect: {error: seq-len, attention: self}",
        "expect: {error: seq-len, tensor: mask}",
        "expect: {error: rank, layer: 0, attention: cross, tensor: key}",
    ] {
        let r = judge(other);
        assert_eq!(r.status, Status::Fail, "{other}");
        let m = r.message.unwrap_or_default();
        assert!(
            m.starts_with("expected ") && m.contains("seq-len"),
            "{other}: {m}"
        );
    }
    // A passing case expected to fail, and a failing one expected to pass.
    let text = std::fs::read_to_string(file).unwrap();
    let fixed = text.replace(
        "cross_prefix_marks_updated: true",
        "cross_prefix_marks_updated: false",
    );
    let case = scenario::parse(std::path::Path::new(file), &fixed)
        .unwrap()
        .remove(0);
    let r = run_case(&case);
    assert_eq!(r.status, Status::Fail);
    assert!(r.message.unwrap().contains("fixed? update the scenario"));
    let r = judge("expect: pass");
    assert_eq!(r.status, Status::Fail);
    assert_eq!(r.diagnosis.unwrap().layer, Some(0));
}

/// `checks: {loss: decreases}` holds when training lowers the loss and fails the case,
/// with both losses, when it does not (one step: the last loss is the first).
#[test]
fn the_loss_check_fails_a_case_whose_loss_does_not_decrease() {
    use prefix_harness::harness::run::{run_case, Status};
    use prefix_harness::harness::scenario;
    let yaml = |steps: usize| {
        format!(
            "name: loss\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 2\ntrain: {{steps: {steps}, batch_size: 2, max_len: 16, evaluate: false}}\ngenerate:\n  max_new_tokens: 1\nchecks:\n  loss: decreases\n"
        )
    };
    let file = std::path::Path::new("loss.yaml");
    let run = |steps| run_case(&scenario::parse(file, &yaml(steps)).unwrap().remove(0));
    let r = run(10);
    assert_eq!(r.status, Status::Pass, "{:?}", r.message);
    let r = run(1);
    assert_eq!(r.status, Status::Fail);
    let m = r.message.unwrap();
    assert!(
        m.starts_with("checks.loss: decreases, but the loss went from"),
        "{m}"
    );
}

/// A warning-level diagnosis (`prefix-evicted`) meets an expectation of its class: the
/// run completes, the case passes and reports the warning as its diagnosis; expecting
/// another class fails it.
#[test]
fn an_expected_warning_passes_the_judge_and_another_class_does_not() {
    use prefix_harness::harness::run::Status;
    let exact = "expect: {error: prefix-evicted, layer: 0, attention: self, tensor: key}";
    let judge = judged_with("scenarios/bugs/sliding-window-evicts-prefix.yaml", exact);
    let r = judge(exact);
    assert_eq!(r.status, Status::Pass, "{:?}", r.message);
    assert_eq!(r.diagnosis.unwrap().class, DiagnosisClass::PrefixEvicted);
    let r = judge("expect: {error: seq-len}");
    assert_eq!(r.status, Status::Fail);
    assert!(r
        .message
        .unwrap()
        .contains("expected a `seq-len` failure but the case passed"));
}

/// A sliding cache seeded with more prefix positions than the P it is told: the first
/// update finds more keys than positions, a `seq-len` diagnosis whose expected shape is
/// the positions (P told + new) and whose actual shape is the keys (P held + new).
#[test]
fn a_prefix_longer_than_its_declared_length_is_a_seq_len_failure_with_both_counts() {
    use prefix_harness::engine::cache::{CacheConfig, Layout};
    let kv = |n: usize| Tensor::ones((1, 1, n, 4), candle_core::DType::F32, &Device::Cpu).unwrap(); // [B, KVH, n, D]
    let mut cfg = CacheConfig::new(CacheMode::Sliding { window: 16 });
    cfg.window = Some(16);
    let mut cache = ModelCache::new(cfg, Layout::Standard, 1, false);
    cache.seed(0, Attention::SelfAttn, kv(4), kv(4), 2).unwrap(); // 4 held, P told 2
    let err = cache.update_self(0, &kv(3), &kv(3), (2, 5)).unwrap_err();
    let EngineError::Shape(d) = err else {
        panic!("not a diagnosis: {err}")
    };
    assert_eq!(d.class, DiagnosisClass::SeqLen, "{d}");
    assert_eq!(
        (d.expected_shape.clone(), d.actual_shape.clone()),
        (vec![5], vec![7]),
        "{d}"
    );
}
