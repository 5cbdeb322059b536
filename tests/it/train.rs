//! Training a prefix: every family learns on the built-in data, runs are reproducible,
//! the gradient check catches a cut graph (fused ops without backward) and a changed
//! base weight.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::diagnosis::{Attention, DiagnosisClass, EngineError, TensorKind};
use prefix_harness::engine::generate::DecodeOptions;
use prefix_harness::engine::model::{weights, Family, ModelConfig};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder, PrefixInit};
use prefix_harness::engine::train::{
    batch_for, batch_logits, batch_logits_in, block_uses, causal_batch, check_base_unchanged,
    check_grads, check_prefix_grads, data_loss, masked_cross_entropy, seq2seq_batch, train,
    train_checked, BaseWeights, TrainConfig, TrainReport, IGNORE_INDEX,
};
use prefix_harness::io::data;
use proptest::prelude::*;
use rstest::rstest;

use crate::common::{family_test, proptest_config, tiny_model, SEED};

fn cpu() -> Device {
    Device::Cpu
}

fn prefix_with(
    model: &dyn prefix_harness::engine::model::Model,
    p: usize,
    projection: bool,
) -> PrefixEncoder {
    let mut cfg = PrefixConfig::new(p);
    cfg.seed = SEED + 1;
    cfg.projection = projection;
    PrefixEncoder::new(&cfg, &model.geometry(), &cpu()).expect("prefix builds")
}

fn no_grad_diagnosis(e: &EngineError) -> &prefix_harness::engine::diagnosis::Diagnosis {
    let d = e
        .diagnosis()
        .unwrap_or_else(|| panic!("expected a diagnosis, got {e}"));
    assert_eq!(d.class, DiagnosisClass::NoGrad, "{d}");
    d
}

/// Loss over all rows before and after training.
fn data_losses(r: &TrainReport) -> (f32, f32) {
    (
        r.data_loss_before.expect("evaluated"),
        r.data_loss_after.expect("evaluated"),
    )
}

fn assert_learns(tag: &str, r: &TrainReport) {
    let (first, last) = (r.losses[0], r.losses[r.losses.len() - 1]);
    assert!(
        last < first,
        "{tag}: last loss {last} is not below first {first}: {:?}",
        r.losses
    );
    let (before, after) = data_losses(r);
    assert!(
        after < before,
        "{tag}: loss over all rows went from {before} to {after}"
    );
}

// Acceptance: each family trains 30 steps on the built-in data and ends below its start.
family_test!(
    CLASSIC,
    every_family_trains_on_the_built_in_data,
    |family: Family| {
        let (model, base) =
            BaseWeights::seeded(&ModelConfig::tiny(family), SEED, &cpu()).expect("model builds");
        let prefix = prefix_with(model.as_ref(), 8, false);
        let cfg = TrainConfig::default();
        let t = Instant::now();
        let r = train_checked(model.as_ref(), &base, &prefix, &cfg).expect("training runs");
        let secs = t.elapsed().as_secs_f64();
        println!(
        "train {:<12} P 8 B {} steps {}: first loss {:.4}, last loss {:.4}; all rows {:.4} -> {:.4}; {:.2} s ({:.1} ms/step)",
        family.name(),
        cfg.batch_size,
        cfg.steps,
        r.losses[0],
        r.losses[cfg.steps - 1],
        data_losses(&r).0,
        data_losses(&r).1,
        secs,
        secs * 1e3 / cfg.steps as f64
    );
        assert_eq!(r.losses.len(), cfg.steps);
        assert_learns(family.name(), &r);
        assert_eq!(r.grad_check.params.len(), prefix.vars().len());
        assert_eq!(r.grad_check.base_weights_checked, base.len());
        assert!(base.len() > 5, "{} base weights recorded", base.len());
        let g = prefix.geometry;
        assert_eq!(
            r.grad_check.slices_checked,
            g.num_virtual_tokens * 2 * g.num_layers
        );
    }
);

/// The loss over the data is the mean over every labelled token, however the rows are
/// chunked: one chunk of all rows gives the batch's mean cross-entropy, and chunks of
/// one row give the same.
#[test]
fn the_data_loss_is_the_mean_over_every_labelled_token() {
    let model = tiny_model(Family::Llama);
    let prefix = prefix_with(model.as_ref(), 4, false);
    let rows = &data::SENTIMENT[..4];
    let whole = TrainConfig {
        batch_size: rows.len(),
        ..TrainConfig::default()
    };
    let batch = batch_for(model.as_ref(), rows, whole.max_len, &cpu()).expect("batch");
    let logits = batch_logits(model.as_ref(), &prefix, &batch).expect("logits");
    let mean = masked_cross_entropy(&logits, &batch.labels)
        .expect("loss")
        .to_scalar::<f32>()
        .expect("scalar");
    let all = data_loss(model.as_ref(), &prefix, rows, &whole).expect("loss");
    assert!(
        (all - mean).abs() < 1e-5,
        "one chunk {all}, the batch's mean {mean}"
    );
    let single = TrainConfig {
        batch_size: 1,
        ..whole
    };
    let one = data_loss(model.as_ref(), &prefix, rows, &single).expect("loss");
    assert!(
        (one - mean).abs() < 1e-4,
        "chunks of one row {one}, the batch's mean {mean}"
    );
}

/// The recording builder gives the same model as the plain seeded builder.
#[test]
fn recorded_model_is_the_seeded_model() {
    for family in Family::ALL {
        let plain = tiny_model(family);
        let (recorded, base) =
            BaseWeights::seeded(&ModelConfig::tiny(family), SEED, &cpu()).expect("builds");
        let prefix = prefix_with(plain.as_ref(), 4, false);
        let rows = &data::SENTIMENT[..2];
        let batch = batch_for(plain.as_ref(), rows, 64, &cpu()).expect("batch");
        let a = batch_logits(plain.as_ref(), &prefix, &batch).expect("logits");
        let b = batch_logits(recorded.as_ref(), &prefix, &batch).expect("logits");
        assert_eq!(
            crate::common::max_abs_diff(&a, &b),
            0.0,
            "{}",
            family.name()
        );
        let materialized =
            weights::materialize(&ModelConfig::tiny(family), SEED, &cpu()).expect("materialize");
        assert_eq!(base.len(), materialized.len(), "{}", family.name());
    }
}

/// Same seed twice: bit-identical loss curves and prefixes.
#[test]
fn same_seed_gives_identical_loss_curves() {
    let cfg = TrainConfig {
        steps: 8,
        ..TrainConfig::default()
    };
    for family in [Family::Llama, Family::T5] {
        let run = || {
            let model = tiny_model(family);
            let prefix = prefix_with(model.as_ref(), 6, false);
            let r = train(model.as_ref(), &prefix, &cfg).expect("trains");
            let d = weights::digest(prefix.embedding.as_tensor()).expect("digest");
            (r, d)
        };
        let (a, da) = run();
        let (b, db) = run();
        let bits = |r: &TrainReport| r.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{}: loss curves differ", family.name());
        assert_eq!(da, db, "{}: trained prefixes differ", family.name());
        assert_eq!(a, b);
        // A different row seed gives a different curve.
        let model = tiny_model(family);
        let prefix = prefix_with(model.as_ref(), 6, false);
        let other = TrainConfig {
            seed: 7,
            evaluate: false,
            ..cfg.clone()
        };
        let c = train(model.as_ref(), &prefix, &other).expect("trains");
        assert_ne!(
            bits(&a),
            bits(&c),
            "{}: the row seed is ignored",
            family.name()
        );
    }
}

/// Projection prefixes (Embedding + MLP, PEFT `prefix_projection`) train too; flat
/// prefixes are the default of every other test here.
#[rstest]
fn projection_prefixes_train(#[values(Family::Gpt2, Family::Llama, Family::T5)] family: Family) {
    let (model, base) =
        BaseWeights::seeded(&ModelConfig::tiny(family), SEED, &cpu()).expect("model builds");
    let prefix = prefix_with(model.as_ref(), 8, true);
    let r = train_checked(model.as_ref(), &base, &prefix, &TrainConfig::default())
        .expect("training runs");
    println!(
        "train {:<12} projection P 8: first loss {:.4}, last loss {:.4}; all rows {:.4} -> {:.4}",
        family.name(),
        r.losses[0],
        r.losses[r.losses.len() - 1],
        data_losses(&r).0,
        data_losses(&r).1
    );
    assert_learns(&format!("{} projection", family.name()), &r);
    let names: Vec<&str> = r
        .grad_check
        .params
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "embedding.weight",
            "transform.0.weight",
            "transform.0.bias",
            "transform.2.weight",
            "transform.2.bias"
        ]
    );
    // The MLP's input rows (one per virtual token) are checked one by one.
    assert_eq!(r.grad_check.slices_checked, 8);
}

/// A projection prefix with `init: zero` legitimately gives `transform.0.weight` a zero
/// gradient at the first step (its input is zero); the diagnosis says so.
#[test]
fn zero_init_projection_is_explained() {
    let model = tiny_model(Family::Gpt2);
    let mut cfg = PrefixConfig::new(4);
    cfg.projection = true;
    cfg.init = PrefixInit::Zero;
    let prefix = PrefixEncoder::new(&cfg, &model.geometry(), &cpu()).expect("prefix");
    let err = train(model.as_ref(), &prefix, &TrainConfig::default()).expect_err("no-grad");
    let d = no_grad_diagnosis(&err);
    assert!(d.message.contains("transform.0.weight"), "{}", d.message);
    assert!(d.hint.contains("init: zero"), "{}", d.hint);
}

proptest! {
    #![proptest_config(proptest_config(16))]

    /// Acceptance: for random P and batch, one step gives every prefix parameter (and
    /// every virtual token of every layer's keys and values) a finite non-zero gradient,
    /// and the base weights stay bit-identical.
    #[test]
    fn one_step_gives_every_prefix_parameter_a_gradient(
        p in 1usize..=32,
        batch in 1usize..=4,
        first in 0usize..5,
        second in proptest::option::of(0usize..5),
        projection in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut families = vec![Family::ALL[first]];
        if let Some(s) = second.filter(|&s| s != first) {
            families.push(Family::ALL[s]);
        }
        for family in families {
            let (model, base) = BaseWeights::seeded(&ModelConfig::tiny(family), SEED, &cpu())
                .expect("model builds");
            let prefix = prefix_with(model.as_ref(), p, projection);
            let cfg = TrainConfig {
                steps: 1,
                batch_size: batch,
                seed,
                evaluate: false,
                ..TrainConfig::default()
            };
            let r = train_checked(model.as_ref(), &base, &prefix, &cfg);
            let r = match r {
                Ok(r) => r,
                Err(e) => return Err(TestCaseError::fail(format!("{} P {p} B {batch}: {e}", family.name()))),
            };
            prop_assert_eq!(r.grad_check.params.len(), prefix.vars().len());
            for g in &r.grad_check.params {
                prop_assert!(g.grad_norm.is_finite() && g.grad_norm > 0.0, "{} {:?}", family.name(), g);
            }
            prop_assert_eq!(r.grad_check.base_weights_checked, base.len());
            prop_assert!(base.len() > 5);
        }
    }
}

/// Causal-LM batches: labels are the ids shifted left, -100 on the last token and on
/// padding; the mask is 0 on padding.
#[test]
fn causal_batches_shift_labels_and_mask_padding() {
    let rows = [("ab", "x"), ("abcd", "y")];
    let b = causal_batch(&rows, 64, &cpu()).expect("batch");
    let ids: Vec<Vec<u32>> = b.ids.to_vec2().expect("ids");
    let labels: Vec<Vec<i64>> = b.labels.to_vec2().expect("labels");
    let mask: Vec<Vec<f32>> = b.mask.to_vec2().expect("mask");
    let t0 = data::encode_bytes("ab => x");
    let t1 = data::encode_bytes("abcd => y");
    assert_eq!(ids[1], t1);
    assert_eq!(&ids[0][..t0.len()], &t0[..]);
    assert_eq!(&ids[0][t0.len()..], &[0, 0]);
    assert_eq!(mask[0], [vec![1.0; t0.len()], vec![0.0; 2]].concat());
    let shifted: Vec<i64> = t0[1..].iter().map(|&x| i64::from(x)).collect();
    assert_eq!(&labels[0][..t0.len() - 1], &shifted[..]);
    assert_eq!(&labels[0][t0.len() - 1..], &[IGNORE_INDEX; 3]);
    assert_eq!(labels[1][t1.len() - 1], IGNORE_INDEX);
    // max_len cuts the text.
    let cut = causal_batch(&rows, 3, &cpu()).expect("batch");
    assert_eq!(cut.ids.dims(), &[2, 3]);
}

/// Seq2seq batches: decoder input = start + labels shifted right; labels end in EOS.
#[test]
fn seq2seq_batches_shift_the_decoder_input() {
    let rows = [("hi", "ok"), ("hello", "bad")];
    let b = seq2seq_batch(&rows, 64, 0, 1, &cpu()).expect("batch");
    let (dec, dmask) = b.decoder.clone().expect("decoder");
    let dec: Vec<Vec<u32>> = dec.to_vec2().expect("dec");
    let dmask: Vec<Vec<f32>> = dmask.to_vec2().expect("mask");
    let labels: Vec<Vec<i64>> = b.labels.to_vec2().expect("labels");
    assert_eq!(labels[1], vec![98, 97, 100, 1]);
    assert_eq!(dec[1], vec![0, 98, 97, 100]);
    assert_eq!(labels[0], vec![111, 107, 1, IGNORE_INDEX]);
    assert_eq!(dec[0], vec![0, 111, 107, 0]);
    assert_eq!(dmask[0], vec![1.0, 1.0, 1.0, 0.0]);
    let enc_mask: Vec<Vec<f32>> = b.mask.to_vec2().expect("mask");
    assert_eq!(enc_mask[0], vec![1.0, 1.0, 0.0, 0.0, 0.0]);
}

/// Padding is invisible: a short row's logits are the same alone and right-padded
/// next to a longer row, in every family.
#[test]
fn padding_does_not_change_a_rows_logits() {
    let short = data::SENTIMENT[7];
    let long = data::SENTIMENT[0];
    for family in Family::ALL {
        let model = tiny_model(family);
        let prefix = prefix_with(model.as_ref(), 5, false);
        let alone = batch_for(model.as_ref(), &[short], 64, &cpu()).expect("batch");
        let padded = batch_for(model.as_ref(), &[long, short], 64, &cpu()).expect("batch");
        let a = batch_logits(model.as_ref(), &prefix, &alone).expect("logits"); // [1, T, V]
        let b = batch_logits(model.as_ref(), &prefix, &padded).expect("logits"); // [2, T', V]
        let t = a.dim(1).expect("T");
        let b1 = b
            .narrow(0, 1, 1)
            .and_then(|x| x.narrow(1, 0, t))
            .expect("row 1");
        let diff = crate::common::max_abs_diff(&a, &b1);
        assert!(
            diff < 1e-4,
            "{}: padding changed logits by {diff}",
            family.name()
        );
    }
}

/// Every block of a flat prefix is used somewhere, following PEFT's `get_prompt`.
#[test]
fn block_uses_follow_get_prompt() {
    for family in Family::ALL {
        let model = tiny_model(family);
        let prefix = prefix_with(model.as_ref(), 2, false);
        let g = prefix.geometry;
        let mut seen = std::collections::HashSet::new();
        for j in 0..2 * g.num_layers {
            let uses = block_uses(&g, j);
            assert_eq!(
                uses.len(),
                g.num_transformer_submodules,
                "{}",
                family.name()
            );
            seen.extend(uses);
        }
        assert_eq!(seen.len(), 2 * g.num_layers * g.num_transformer_submodules);
    }
    let model = tiny_model(Family::Gpt2);
    let g = prefix_with(model.as_ref(), 2, false).geometry;
    assert_eq!(
        block_uses(&g, 3),
        vec![(1, Attention::SelfAttn, TensorKind::Value)]
    );
}

#[test]
fn invalid_train_settings_are_config_errors() {
    let model = tiny_model(Family::Gpt2);
    let prefix = prefix_with(model.as_ref(), 2, false);
    for cfg in [
        TrainConfig {
            steps: 0,
            ..TrainConfig::default()
        },
        TrainConfig {
            batch_size: 0,
            ..TrainConfig::default()
        },
        TrainConfig {
            lr: f64::NAN,
            ..TrainConfig::default()
        },
        TrainConfig {
            max_len: 1,
            ..TrainConfig::default()
        },
    ] {
        let err = train(model.as_ref(), &prefix, &cfg).expect_err("rejected");
        assert!(matches!(err, EngineError::Config(_)), "{err}");
    }
    let yaml: TrainConfig = serde_json::from_str(r#"{"steps": 5, "lr": 0.1}"#).expect("partial");
    assert_eq!(yaml.steps, 5);
    assert_eq!(yaml.batch_size, TrainConfig::default().batch_size);
    assert!(serde_json::from_str::<TrainConfig>(r#"{"stpes": 5}"#).is_err());
}

/// The masked loss equals candle-nn's cross-entropy over the labelled positions only.
#[test]
fn masked_cross_entropy_matches_candle_on_labelled_positions() {
    let (b, t, v) = (2, 3, 7);
    let vals: Vec<f32> = (0..b * t * v)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 5.0)
        .collect();
    let logits = Tensor::from_vec(vals, (b, t, v), &cpu()).expect("logits"); // [B, T, V]
    let labels =
        Tensor::new(&[[3i64, IGNORE_INDEX, 0], [6, 2, IGNORE_INDEX]], &cpu()).expect("labels"); // [B, T]
    let ours: f32 = masked_cross_entropy(&logits, &labels)
        .expect("loss")
        .to_scalar()
        .expect("scalar");
    // Labelled positions: (0,0), (0,2), (1,0), (1,1).
    let rows = Tensor::stack(
        &[(0, 0), (0, 2), (1, 0), (1, 1)]
            .map(|(i, j)| logits.get(i).and_then(|r| r.get(j)).expect("row")),
        0,
    )
    .expect("rows"); // [4, V]
    let targets = Tensor::new(&[3u32, 0, 6, 2], &cpu()).expect("targets"); // [4]
    let reference = candle_nn::loss::cross_entropy(&rows, &targets)
        .and_then(|l| l.to_scalar::<f32>())
        .expect("reference");
    assert!((ours - reference).abs() < 1e-6, "{ours} vs {reference}");
    // A label outside the vocabulary is a configuration error, not a panic.
    let bad = Tensor::new(&[[7i64, 0, 0], [0, 0, 0]], &cpu()).expect("labels");
    assert!(matches!(
        masked_cross_entropy(&logits, &bad),
        Err(EngineError::Config(_))
    ));
}

#[test]
fn a_train_report_names_its_first_and_last_loss() {
    let cfg = TrainConfig {
        steps: 3,
        evaluate: false,
        ..TrainConfig::default()
    };
    let model = tiny_model(Family::Gpt2);
    let prefix = PrefixEncoder::new(&PrefixConfig::new(2), &model.geometry(), &cpu()).unwrap();
    let r: TrainReport = train(model.as_ref(), &prefix, &cfg).unwrap();
    assert_eq!(r.losses.len(), 3);
    assert_eq!(r.first_loss(), Some(r.losses[0]));
    assert_eq!(r.last_loss(), Some(r.losses[2]));
    assert_ne!(r.first_loss(), r.last_loss(), "the loss moved");
    let empty = TrainReport {
        losses: vec![],
        ..r
    };
    assert_eq!((empty.first_loss(), empty.last_loss()), (None, None));
}

/// The memory guard's estimate of the weights is an upper bound of what the model
/// really holds, and not a wild one: between 1x and 2x the bytes of every weight the
/// model read (measured 1.10x to 1.50x), for every family (a tiny config and a wider,
/// deeper one).
#[test]
fn the_weights_estimate_bounds_the_real_weights_within_2x() {
    use prefix_harness::harness::run::estimate_memory;
    use prefix_harness::harness::scenario;
    for family in Family::ALL {
        for wide in [false, true] {
            let cfg = if !wide {
                String::new()
            } else {
                // Twice the width, three layers, in each family's own field names.
                let (h, l) = match family {
                    Family::Gpt2 | Family::GptBigcode => ("n_embd", "n_layer"),
                    Family::Llama => ("hidden_size", "num_hidden_layers"),
                    Family::Bloom => ("hidden_size", "n_layer"),
                    Family::T5 => ("d_model", "num_layers"),
                    #[allow(unreachable_patterns)]
                    _ => continue,
                };
                format!("\n  config: {{{h}: 128, {l}: 3}}")
            };
            let yaml = format!(
                "name: est\nmodel:\n  family: {}{cfg}\nprefix:\n  virtual_tokens: 2\n",
                family.name()
            );
            let case = scenario::parse(std::path::Path::new("est.yaml"), &yaml)
                .unwrap()
                .remove(0);
            let (weights, caches, activations) = estimate_memory(&case).unwrap();
            let mcfg = case.model_config().unwrap();
            let (_, base) = BaseWeights::seeded(&mcfg, 1, &cpu()).unwrap();
            let real: u64 = base
                .tensors
                .values()
                .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                .sum();
            let ratio = weights as f64 / real as f64;
            assert!(
                (1.0..=2.0).contains(&ratio),
                "{} {cfg}: estimated {weights} bytes of weights, the model holds {real} ({ratio:.2}x)",
                family.name()
            );
            assert!(caches > 0 && activations > 0);
        }
    }
}

/// The memory guard's estimates of the caches and the activations against tensors a
/// real generation holds: the cache estimate bounds the cache a dynamic-cache
/// generation ends with (prefix + prompt + new tokens, K and V, every layer; T5's cross
/// caches too) within 1x..2x (measured 1.06x decoder-only, 1.55x T5, whose decoder
/// cache holds no prompt), and the activation estimate is at least the logits of
/// every position and at most 50x them, for a decoder-only and an encoder-decoder
/// family. (Batch 2, P 5, prompt 8, 4 new tokens.)
#[test]
fn the_cache_and_activation_estimates_bound_a_real_generation() {
    use prefix_harness::engine::generate::greedy;
    use prefix_harness::harness::run::estimate_memory;
    use prefix_harness::harness::scenario;
    for family in [Family::Gpt2, Family::Llama, Family::T5] {
        // `extra`: more YAML under `model:` and at the top level.
        let case_with = |model_extra: &str, top_extra: &str| {
            let yaml = format!(
                "name: est\nmodel:\n  family: {}\n{model_extra}prefix:\n  virtual_tokens: 5\n\
                 data:\n  batch_size: 2\n  max_prompt_len: 8\ngenerate:\n  max_new_tokens: 4\n{top_extra}",
                family.name()
            );
            scenario::parse(std::path::Path::new("est.yaml"), &yaml)
                .unwrap()
                .remove(0)
        };
        let case = case_with("", "");
        let (_, caches, activations) = estimate_memory(&case).unwrap();
        let mcfg = case.model_config().unwrap();
        let model = mcfg
            .build(weights::seeded(SEED, DType::F32, &cpu()))
            .unwrap();
        let prefix = PrefixEncoder::new(&case.prefix_config(), &model.geometry(), &cpu()).unwrap();
        let ids = Tensor::ones((2, 8), DType::U32, &cpu()).unwrap(); // [B, S]
        let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 4);
        let out = greedy(model.as_ref(), Some(&prefix), &opts, &ids, None).unwrap();
        let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let mut real = 0;
        for layer in 0..out.cache.num_layers() {
            for (k, v) in [out.cache.stored_self(layer), out.cache.stored_cross(layer)]
                .into_iter()
                .flatten()
            {
                real += bytes(&k) + bytes(&v);
            }
        }
        let ratio = caches as f64 / real as f64;
        assert!(
            (1.0..=2.0).contains(&ratio),
            "{}: estimated {caches} bytes of caches, the generation holds {real} ({ratio:.2}x)",
            family.name()
        );
        // Logits of every position: [B, P + S + new, V] f32.
        let v = model.geometry().vocab_size as u64;
        let logits = 2 * (5 + 8 + 4) * v * 4;
        let ratio = activations as f64 / logits as f64;
        assert!(
            (1.0..=50.0).contains(&ratio),
            "{}: estimated {activations} bytes of activations, {ratio:.1}x the logits",
            family.name()
        );
        // Training keeps every layer's activations for the backward pass: the trained
        // estimate grows with depth (2 -> 6 layers).
        let key = match family {
            Family::Gpt2 => "n_layer",
            Family::T5 => "num_layers",
            _ => "num_hidden_layers",
        };
        let trained = |layers: usize| {
            let case = case_with(
                &format!("  config: {{{key}: {layers}}}\n"),
                "train:\n  steps: 1\n",
            );
            estimate_memory(&case).unwrap().2 as f64
        };
        let (deep, shallow) = (trained(6), trained(2));
        assert!(
            deep > 1.5 * shallow,
            "{}: trained activations {deep} (6 layers) vs {shallow} (2 layers)",
            family.name()
        );
    }
}

/// The activation estimate is at least what one layer's forward pass creates over every
/// position, so at least its peak: the hidden state and q, k, v, o `[B, T, E]`, the
/// scores and probabilities `[B, H, T, T]`, the MLP's inner activations before and
/// after the nonlinearity `[B, T, I]`, and the logits `[B, T, V]`, f32 (T = P + the
/// longest prompt + new tokens). For the tiny configs and for ones where each term
/// dominates in turn: a long prompt (scores), a wide hidden state, a wide MLP.
#[test]
fn the_activation_estimate_covers_one_layers_forward_pass() {
    use prefix_harness::harness::run::estimate_memory;
    use prefix_harness::harness::scenario;
    let cases = [
        ("gpt2", "", 8),
        ("llama", "", 8),
        ("t5", "", 8),
        ("gpt2", "", 120),
        ("gpt2", "  config: {n_embd: 512, n_inner: 64}\n", 8),
        ("llama", "  config: {intermediate_size: 2048}\n", 8),
    ];
    for (family, config, prompt) in cases {
        let yaml = format!(
            "name: est\nmodel:\n  family: {family}\n{config}prefix:\n  virtual_tokens: 5\n\
             data:\n  batch_size: 2\n  max_prompt_len: {prompt}\ngenerate:\n  max_new_tokens: 4\n"
        );
        let case = scenario::parse(std::path::Path::new("est.yaml"), &yaml)
            .unwrap()
            .remove(0);
        let (_, _, activations) = estimate_memory(&case).unwrap();
        let mcfg = case.model_config().unwrap();
        let g = mcfg.geometry();
        let inner = mcfg.mlp_width() as u64;
        let (e, h, v) = (
            g.hidden_size as u64,
            g.num_attention_heads as u64,
            g.vocab_size as u64,
        );
        let t = 5 + prompt + 4;
        let one_layer = 4 * 2 * (5 * t * e + 2 * h * t * t + 2 * t * inner + t * v);
        assert!(
            activations >= one_layer,
            "{family} {config} prompt {prompt}: estimated {activations} bytes of activations, \
             one layer's forward pass creates {one_layer}"
        );
    }
}

/// Beam search multiplies the rows every cache holds: the cache estimate of a 3-beam
/// case bounds the cache its beam search really ends with (B x 3 rows: prefix, prompt
/// and new tokens, K and V, every layer) within 1x..2x, as for greedy decoding.
#[test]
fn the_cache_estimate_counts_every_beam() {
    use prefix_harness::harness::run::{estimate_memory, prepare};
    use prefix_harness::harness::scenario;
    let yaml = "name: est\nmodel:\n  family: llama\nprefix:\n  virtual_tokens: 5\n\
                data:\n  batch_size: 2\n  max_prompt_len: 8\n\
                generate:\n  max_new_tokens: 4\n  strategy: {beam: {num_beams: 3}}\n";
    let case = scenario::parse(std::path::Path::new("est.yaml"), yaml)
        .unwrap()
        .remove(0);
    let (_, caches, _) = estimate_memory(&case).unwrap();
    let p = prepare(&case).unwrap();
    let out = p.generation().generate().unwrap();
    let mut real = 0u64;
    let mut rows = 0;
    for layer in 0..out.cache.num_layers() {
        if let Some((k, v)) = out.cache.stored_self(layer) {
            rows = k.dim(0).unwrap();
            real += ((k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()) as u64;
        }
    }
    assert_eq!(rows, 2 * 3, "the cache holds every beam of every row");
    let ratio = caches as f64 / real as f64;
    assert!(
        (1.0..=2.0).contains(&ratio),
        "estimated {caches} bytes of caches, the beam search holds {real} ({ratio:.2}x)"
    );
}

/// Decoupled weight decay reaches AdamW: with `weight_decay` the prefix shrinks towards
/// zero on top of the Adam update, so from the second step on the losses differ from
/// the same run without it, and the first loss (before any update) does not. The
/// values themselves are checked against torch.optim.AdamW by
/// `scenarios/stack/train-adamw.yaml` (`.ci/run`).
#[test]
fn weight_decay_changes_training_from_the_second_step_on() {
    let model = tiny_model(Family::Llama);
    let run = |wd: f64| {
        let prefix = PrefixEncoder::new(&PrefixConfig::new(2), &model.geometry(), &cpu()).unwrap();
        let cfg = TrainConfig {
            steps: 4,
            weight_decay: wd,
            evaluate: false,
            ..TrainConfig::default()
        };
        train(model.as_ref(), &prefix, &cfg).unwrap().losses
    };
    let (plain, decayed) = (run(0.0), run(0.5));
    assert_eq!(plain[0], decayed[0], "the first loss is before any update");
    for k in 1..4 {
        assert!(
            (plain[k] - decayed[k]).abs() > 1e-4,
            "step {k}: {} vs {}: weight decay had no effect",
            plain[k],
            decayed[k]
        );
    }
}

mod checks;
