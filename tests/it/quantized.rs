//! The `quantized` cache end to end: close to `dynamic` at 8 bits on every family's
//! tiny model, saved and restored bit for bit, reported and bounded by
//! `checks.quantization` (the store's own invariants are unit tests in
//! `src/engine/cache/quant.rs`).

use crate::common::*;
use candle_core::Tensor;
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::divergence::compare_quantized;
use prefix_harness::engine::generate::{DecodeOptions, DecodeOutput, Generation};
use prefix_harness::engine::model::Family;
use prefix_harness::harness::run::{run_case, Status};
use prefix_harness::harness::scenario;
use rstest::rstest;

const P: usize = 8;
const B: usize = 2;
const S: usize = 12;
const NEW: usize = 8;

fn quantized(bits: u8, residual: usize, prefix_full_precision: bool) -> CacheMode {
    CacheMode::Quantized {
        bits,
        residual,
        prefix_full_precision,
    }
}

/// Greedy generation of `NEW` tokens after `B` prompts of `S` tokens with a prefix of
/// `P`, in `mode`; `f` adjusts the options.
fn run(family: Family, mode: CacheMode, f: impl Fn(&mut DecodeOptions)) -> DecodeOutput {
    let model = tiny_model(family);
    let prefix = prefix(model.as_ref(), P);
    let mut opts = DecodeOptions::new(CacheConfig::new(mode), NEW);
    f(&mut opts);
    Generation {
        model: model.as_ref(),
        prefix: Some(&prefix),
        opts: &opts,
        ids: &prompt(B, S),
        pad: None,
    }
    .generate()
    .unwrap_or_else(|e| panic!("{} {mode:?}: {e}", family.name()))
}

/// Gap between the two largest logits of `row` of `[N, V]`.
fn top2_gap(logits: &Tensor, row: usize) -> f32 {
    let mut v: Vec<f32> = logits.get(row).unwrap().to_vec1().unwrap();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

/// 8 bits, the last 4 positions exact, the prefix quantized too, on every family's tiny
/// model (P 8, two rows of 12 prompt tokens, 8 new tokens), against `dynamic`: while
/// both runs are fed the same tokens no logit moves by more than `MAX_DRIFT_8`, and a
/// token may differ only where the unquantized run's top two logits are within twice
/// that drift of each other (a near-tie the drift can flip).
///
/// Measured (`cargo test --test it quantized:: -- --nocapture`, the `drift` lines; the
/// logits of these models are within +-4): gpt2 0.0153, llama 0.0216, bloom 0.0029,
/// gpt_bigcode 0.0126, t5 0.0031, qwen2 0.0295, mistral 0.0092, qwen3 0.0208, phi3
/// 0.0241, gpt_neox 0.0047. Every family's tokens agree but mistral's, whose row 1
/// flips at the prefill on a near-tie (the quantized prefix) and agrees on 0.5 of the
/// tokens. The bound 0.1 is 3.4 times the largest; at 4 bits the same runs drift by
/// 0.04 to 0.51 and 7 of the 10 families flip a token, so the bound tells 8 bits from
/// 4 bits.
const MAX_DRIFT_8: f32 = 0.1;

family_test!(
    BEFORE_GEMMA,
    eight_bits_stay_close_to_dynamic,
    |family: Family| {
        let q = run(family, quantized(8, 4, false), |_| {});
        let d = run(family, CacheMode::Dynamic, |_| {});
        let rep = compare_quantized(&q, &d).unwrap();
        let drift = rep.max_logit_drift_same_inputs;
        eprintln!(
        "drift {}: {drift:.4} while the inputs agree, {:.4} overall, token agreement {:.4}, first difference {:?}",
        family.name(),
        rep.max_logit_drift,
        rep.token_agreement,
        rep.first_token_difference
    );
        assert!(
            drift <= MAX_DRIFT_8,
            "{}: 8-bit logits drift by {drift} from dynamic (bound {MAX_DRIFT_8})",
            family.name()
        );
        if let Some(f) = rep.first_token_difference {
            let gap = top2_gap(&d.logits[f.step], f.row);
            assert!(
            gap <= 2.0 * drift,
            "{}: step {} row {}: the tokens differ though dynamic's top two logits are {gap} apart (drift {drift})",
            family.name(),
            f.step,
            f.row
        );
        }
        // Something was quantized.
        assert!(drift > 0.0, "{}: no drift at all", family.name());
    }
);

/// `[1, 2, n, 3]` of irregular values from `seed`.
fn kv(n: usize, seed: f32) -> Tensor {
    let v: Vec<f32> = (0..2 * n * 3)
        .map(|i| (i as f32 * 0.73 + seed).sin() * 2.0 + (i as f32 * 0.11).cos())
        .collect();
    Tensor::from_vec(v, (1, 2, n, 3), &candle_core::Device::Cpu).unwrap()
}

fn cat(parts: &[&Tensor]) -> Tensor {
    Tensor::cat(parts, 2).unwrap()
}

/// `x: [1, 2, n, 3]` through 4-bit codes and back.
fn round_trip(x: &Tensor) -> Tensor {
    use prefix_harness::engine::cache::quant::{dequantize, quantize};
    dequantize(&quantize(x, 4).unwrap()).unwrap()
}

/// What attention reads, through `ModelCache::update_self` itself: the held positions
/// dequantized (the prefix too, at the first step, unless pinned) and the step's own
/// keys exact; the positions that leave the exact window are quantized afterwards,
/// together with the dequantized older ones.
#[rstest]
fn a_step_reads_the_held_positions_dequantized_and_its_own_exact(
    #[values(false, true)] pinned: bool,
) {
    use prefix_harness::engine::cache::{Layout, ModelCache};
    use prefix_harness::engine::diagnosis::Attention;
    let exact = |a: &Tensor, b: &Tensor, what: &str| {
        assert_eq!(a.dims(), b.dims(), "pinned {pinned}: {what}");
        assert_eq!(max_abs_diff(a, b), 0.0, "pinned {pinned}: {what}");
    };
    // P 6, R 2, 4 bits: at the prefill 5 prompt positions, then 1.
    let mut c = ModelCache::new(
        CacheConfig::new(quantized(4, 2, pinned)),
        Layout::Standard,
        1,
        false,
    );
    let (pk, pv) = (kv(6, 0.5), kv(6, 1.5));
    c.seed(0, Attention::SelfAttn, pk.clone(), pv.clone(), 6)
        .unwrap();
    let (k1, v1) = (kv(5, 2.5), kv(5, 3.5));
    let read = c.update_self(0, &k1, &v1, (6, 11)).unwrap();
    // The prefix: pinned exact, else its first 4 positions quantized, the last 2 exact.
    let prefix_read = |t: &Tensor| {
        if pinned {
            t.clone()
        } else {
            cat(&[
                &round_trip(&t.narrow(2, 0, 4).unwrap()),
                &t.narrow(2, 4, 2).unwrap(),
            ])
        }
    };
    exact(
        &read.k,
        &cat(&[&prefix_read(&pk), &k1]),
        "keys read at the prefill",
    );
    exact(
        &read.v,
        &cat(&[&prefix_read(&pv), &v1]),
        "values read at the prefill",
    );
    // Held afterwards: everything but the last 2 positions quantized again (the prefix
    // stays out when pinned).
    let held = |p: &Tensor, new: &Tensor| {
        if pinned {
            cat(&[
                p,
                &round_trip(&new.narrow(2, 0, 3).unwrap()),
                &new.narrow(2, 3, 2).unwrap(),
            ])
        } else {
            let old = cat(&[&prefix_read(p), &new.narrow(2, 0, 3).unwrap()]);
            cat(&[&round_trip(&old), &new.narrow(2, 3, 2).unwrap()])
        }
    };
    let (k2, v2) = (kv(1, 4.5), kv(1, 5.5));
    let read = c.update_self(0, &k2, &v2, (11, 12)).unwrap();
    exact(
        &read.k,
        &cat(&[&held(&pk, &k1), &k2]),
        "keys read at step 1",
    );
    exact(
        &read.v,
        &cat(&[&held(&pv, &v1), &v2]),
        "values read at step 1",
    );
}

/// With a residual beyond every position nothing is quantized: the store must then
/// give exactly what `dynamic` gives, greedy and with beams (whose reorders select the
/// rows of every part), with the prefix pinned or not. This pins the plumbing (the
/// prefix merged first, the parts read in time order, rows reordered) apart from the
/// arithmetic.
#[rstest]
fn with_nothing_quantized_it_is_dynamic(
    #[values(Family::Gpt2, Family::Llama, Family::Bloom, Family::T5)] family: Family,
    #[values(false, true)] pinned: bool,
    #[values(false, true)] beams: bool,
) {
    let strategy = |o: &mut DecodeOptions| {
        if beams {
            o.request.strategy = prefix_harness::engine::generate::Strategy::Beam {
                num_beams: 3,
                length_penalty: 1.0,
                early_stopping: false,
            };
            o.request.num_return_sequences = 2;
        }
    };
    let q = run(family, quantized(4, 1000, pinned), strategy);
    let d = run(family, CacheMode::Dynamic, strategy);
    let what = format!("{} pinned {pinned} beams {beams}", family.name());
    assert_eq!(q.tokens, d.tokens, "{what}");
    for (step, (a, b)) in q.logits.iter().zip(&d.logits).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "{what}: logits of step {step}");
    }
}

/// The cache saved after step K and read back equals the uninterrupted quantized run:
/// the same tokens and bit-identical logits (codes, scales, zero points and the exact
/// parts are stored as they are).
#[rstest]
fn saved_after_step_k_equals_the_uninterrupted_run(
    #[values(Family::Gpt2, Family::Llama, Family::Bloom, Family::T5)] family: Family,
    #[values(0, 3, 6)] save_at: usize,
    #[values((8, false), (4, true))] settings: (u8, bool),
) {
    let (bits, pinned) = settings;
    let mode = quantized(bits, 3, pinned);
    let plain = run(family, mode, |_| {});
    let restored = run(family, mode, |o| o.save_at = Some(save_at));
    let what = format!("{} {mode:?} saved after step {save_at}", family.name());
    assert_eq!(restored.tokens, plain.tokens, "{what}");
    for (step, (a, b)) in restored.logits.iter().zip(&plain.logits).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "{what}: logits of step {step}");
    }
    for layer in 0..plain.cache.num_layers() {
        let (a, b) = (
            restored.cache.stored_self(layer).unwrap(),
            plain.cache.stored_self(layer).unwrap(),
        );
        assert_eq!(max_abs_diff(&a.0, &b.0), 0.0, "{what}: layer {layer} keys");
        assert_eq!(
            max_abs_diff(&a.1, &b.1),
            0.0,
            "{what}: layer {layer} values"
        );
    }
}

/// The file holds the parts under the names the format documents: codes as u8, scales
/// and zero points per channel, the exact tail and the pinned prefix, and the state
/// says how many positions each holds.
#[test]
fn the_saved_file_holds_codes_scales_zero_points_and_the_exact_parts() {
    let dir = std::env::temp_dir().join(format!("prefix-harness-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cache.safetensors");
    let f = file.clone();
    // Saved after the prefill: P 8 + S 12 = 20 positions, 3 exact, 8 pinned, 9 codes.
    run(Family::Llama, quantized(4, 3, true), move |o| {
        o.save_at = Some(0);
        o.cache_file = Some(f.clone());
    });
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (kvh, d) = (2, 24); // llama tiny: GQA, head_dim 24
    let want = [
        ("self.0.key_codes", "U8", vec![B, kvh, 9, d]),
        ("self.0.value_codes", "U8", vec![B, kvh, 9, d]),
        ("self.0.key_scale", "F32", vec![B, kvh, 1, d]),
        ("self.0.key_zero", "F32", vec![B, kvh, 1, d]),
        ("self.0.value_scale", "F32", vec![B, kvh, 1, d]),
        ("self.0.value_zero", "F32", vec![B, kvh, 1, d]),
        ("self.0.key", "F32", vec![B, kvh, 3, d]),
        ("self.0.value", "F32", vec![B, kvh, 3, d]),
        ("self.0.prefix_key", "F32", vec![B, kvh, P, d]),
        ("self.0.prefix_value", "F32", vec![B, kvh, P, d]),
    ];
    for (name, dtype, shape) in want {
        let t = &header[name];
        assert_eq!(t["dtype"], dtype, "{name}: {t}");
        assert_eq!(t["shape"], serde_json::json!(shape), "{name}: {t}");
    }
    let state: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["state"].as_str().unwrap()).unwrap();
    assert_eq!(state["mode"], "quantized");
    assert_eq!(
        state["quantization"],
        serde_json::json!({"bits": 4, "residual": 3, "prefix_full_precision": true})
    );
    assert_eq!(
        state["layers"][0]["quantized"],
        serde_json::json!({"pinned": 8, "quantized": 9, "recent": 3})
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A scenario case of `cache` and `checks` on a tiny GPT-2.
fn case(cache: &str, checks: &str) -> scenario::Case {
    let text = format!(
        "name: q\nmodel: {{family: gpt2}}\nprefix: {{virtual_tokens: 8}}\ncache: {cache}\ndata: {{batch_size: 2, max_prompt_len: 12}}\ngenerate: {{max_new_tokens: 6}}\n{checks}"
    );
    let mut cases = scenario::parse(std::path::Path::new("q.yaml"), &text)
        .unwrap_or_else(|e| panic!("{text}\n{e}"));
    cases.remove(0)
}

#[test]
fn the_report_of_a_quantized_case_measures_it_against_dynamic() {
    let r = run_case(&case("{mode: quantized, bits: 4}", ""));
    assert_eq!(r.status, Status::Pass, "{:?}", r.message);
    let q = r.quantization.as_ref().expect("a quantization report");
    assert_eq!(q.token_agreement_per_row.len(), 2);
    assert_eq!(q.logit_drift_per_step.len(), 6);
    assert_eq!(q.tokens_compared, 12);
    assert!(q.max_logit_drift > 0.0);
    let json = serde_json::to_value(&r).unwrap();
    for k in [
        "token_agreement",
        "token_agreement_per_row",
        "logit_drift_per_step",
        "max_logit_drift",
        "first_token_difference",
    ] {
        assert!(
            json["quantization"].get(k).is_some(),
            "missing quantization.{k}: {json}"
        );
    }
    // Other modes have no report, and no key in the JSON.
    let r = run_case(&case("{mode: dynamic}", ""));
    assert!(r.quantization.is_none());
    assert!(serde_json::to_value(&r)
        .unwrap()
        .get("quantization")
        .is_none());
}

#[test]
fn checks_quantization_fails_a_case_over_its_bounds_naming_the_field() {
    let cache = "{mode: quantized, bits: 4, residual: 1}";
    // Drift cannot be below 0 once anything is quantized.
    let r = run_case(&case(
        cache,
        "checks: {quantization: {max_logit_drift: 0.0}}",
    ));
    assert_eq!(r.status, Status::Fail);
    let m = r.message.unwrap();
    assert!(
        m.starts_with("checks.quantization.max_logit_drift: 0, but the logits drift from the same case with `cache.mode: dynamic` by up to")
            && m.contains(" over "),
        "{m}"
    );
    // Agreement above 1 is refused as input; exactly 1 fails only if a token differs,
    // so bound it with the drift the run measured instead.
    let measured = run_case(&case(cache, "")).quantization.unwrap();
    let ok = format!(
        "checks: {{quantization: {{min_token_agreement: {}, max_logit_drift: {}}}}}",
        measured.token_agreement,
        measured.max_logit_drift_same_inputs as f64 * 1.01
    );
    let r = run_case(&case(cache, &ok));
    assert_eq!(r.status, Status::Pass, "{:?}", r.message);
    if measured.token_agreement < 1.0 {
        let r = run_case(&case(
            cache,
            "checks: {quantization: {min_token_agreement: 1.0}}",
        ));
        assert_eq!(r.status, Status::Fail);
        assert!(r
            .message
            .unwrap()
            .starts_with("checks.quantization.min_token_agreement: 1, but the tokens agree"),);
    }
}
