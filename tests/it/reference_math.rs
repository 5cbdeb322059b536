//! Pieces of the engine checked against numbers the pinned stack made
//! (`ci/fixtures/make_reference_math.py`): PEFT's projection `PrefixEncoder` on the
//! same weights, and transformers' sampling warpers on the same logits.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use prefix_harness::engine::generate::Sampler;
use prefix_harness::engine::model::ModelGeometry;
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};

use crate::common::max_abs_diff;

const DIR: &str = "tests/fixtures/reference";

fn tensors() -> HashMap<String, Tensor> {
    prefix_harness::io::hub::load_weights(
        &[Path::new(DIR).join("prefix_mlp.safetensors")],
        &Device::Cpu,
    )
    .expect("prefix_mlp.safetensors")
}

/// PEFT's `PrefixEncoder` with `prefix_projection=True`: embedding `[P, token_dim]`,
/// then `transform` = Linear(token_dim, hidden), Tanh, Linear(hidden, L*2*token_dim).
/// Our encoder, given PEFT's parameters, must give PEFT's output `[P, L*2*token_dim]`.
#[test]
fn the_projection_prefix_equals_pefts_prefix_encoder_on_the_same_weights() {
    let t = tensors();
    // (name, P, layers, token_dim, hidden): as in make_reference_math.py.
    for (name, p, layers, token_dim, hidden) in [("small", 3, 2, 16, 8), ("gqa", 5, 3, 24, 32)] {
        let model = ModelGeometry {
            num_layers: layers,
            num_attention_heads: 1,
            num_kv_heads: 1,
            head_dim: token_dim,
            hidden_size: token_dim,
            vocab_size: 16,
            max_positions: None,
            encoder_decoder: false,
        };
        let mut cfg = PrefixConfig::new(p);
        cfg.projection = true;
        cfg.encoder_hidden_size = hidden;
        let enc = PrefixEncoder::new(&cfg, &model, &Device::Cpu).expect("prefix");
        let get = |k: &str| t[&format!("{name}.{k}")].clone();
        enc.embedding
            .set(&get("embedding.weight"))
            .expect("embedding");
        let (w1, b1, w2, b2) = enc.transform.as_ref().expect("projection");
        w1.set(&get("transform.0.weight")).expect("w1");
        b1.set(&get("transform.0.bias")).expect("b1");
        w2.set(&get("transform.2.weight")).expect("w2");
        b2.set(&get("transform.2.bias")).expect("b2");
        let ours = enc.forward().expect("forward"); // [P, L*2*token_dim]
        let want = get("output");
        assert_eq!(ours.dims(), want.dims(), "{name}");
        let d = max_abs_diff(&ours, &want);
        assert!(
            d < 1e-5,
            "{name}: max abs diff {d} against PEFT's PrefixEncoder"
        );
    }
}

/// transformers' warpers in `generate()`'s order (temperature, top-k, top-p), then a
/// softmax: the distribution our sampler draws from must be the same, token by token.
#[test]
fn the_sampling_distribution_equals_transformers_warpers() {
    let text =
        std::fs::read_to_string(Path::new(DIR).join("sampling.json")).expect("sampling.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let logits: Vec<f32> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let what = format!(
            "temperature {}, top_k {}, top_p {}",
            c["temperature"], c["top_k"], c["top_p"]
        );
        let s = Sampler::new(
            c["temperature"].as_f64().unwrap(),
            c["top_k"].as_u64().map(|k| k as usize),
            c["top_p"].as_f64(),
        );
        let ours = s.distribution(&logits).unwrap();
        let want: Vec<f64> = c["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let d = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let kept = want.iter().filter(|p| **p > 0.0).count();
        let ours_kept = ours.iter().filter(|p| **p > 0.0).count();
        assert_eq!(ours_kept, kept, "{what}: tokens kept");
        assert!(d < 1e-6, "{what}: max probability difference {d}");
    }
}
