//! Pieces of the engine checked against numbers the pinned stack made
//! (`ci/fixtures/make_reference_math.py`): PEFT's projection `PrefixEncoder` on the
//! same weights, transformers' sampling warpers on the same logits, and transformers'
//! beam search (`generate(num_beams=..)`) on the fixture models.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::generate::{DecodeOptions, Generation, Sampler, Strategy};
use prefix_harness::engine::model::ModelGeometry;
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::io::hub::{self, HubOptions, ModelSource};

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

/// A returned beam's tokens up to and including the first EOS: transformers pads the
/// returned sequences to the longest row of the batch, the engine to the longest
/// of all rows; after EOS both only repeat the pad id (= EOS here).
fn until_eos(tokens: &[u64], eos: u64) -> Vec<u64> {
    match tokens.iter().position(|t| *t == eos) {
        Some(i) => tokens[..=i].to_vec(),
        None => tokens.to_vec(),
    }
}

/// transformers' beam search on the fixture models without a prefix (3 beams, all 3
/// returned, 8 new tokens, an EOS the models emit): for every `length_penalty` in
/// {1, 0, 2} and `early_stopping` in {false, true}, our beams must return the same
/// sequences in the same order, with the same scores (`sequences_scores`).
#[test]
fn beam_search_equals_transformers_generate_with_length_penalty_and_early_stopping() {
    let text = std::fs::read_to_string(Path::new(DIR).join("beams.json")).expect("beams.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompt: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let ids = Tensor::new(prompt.clone(), &Device::Cpu).unwrap(); // [B, S]
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let opts = HubOptions::with_cache_dir(std::env::temp_dir());
    let mut compared = 0;
    for c in cases {
        let name = c["model"].as_str().unwrap();
        let eos = c["eos_token_id"].as_u64().unwrap();
        // The fixture is useful only if the settings change the outcome.
        assert!(c["distinct_outputs"].as_u64().unwrap() >= 3, "{name}");
        let source = ModelSource::path(Path::new("tests/fixtures/models").join(name));
        let (_, model, _) = hub::load_model_with(&source, &opts, &Device::Cpu).expect(name);
        for s in c["settings"].as_array().unwrap() {
            let length_penalty = s["length_penalty"].as_f64().unwrap();
            let early_stopping = s["early_stopping"].as_bool().unwrap();
            let what = format!(
                "{name}, eos {eos}, length_penalty {length_penalty}, early_stopping {early_stopping}"
            );
            let num_beams = c["num_beams"].as_u64().unwrap() as usize;
            let mut o = DecodeOptions::new(
                CacheConfig::new(CacheMode::Dynamic),
                c["max_new_tokens"].as_u64().unwrap() as usize,
            )
            .with_strategy(Strategy::Beam {
                num_beams,
                length_penalty,
                early_stopping,
            });
            o.request.eos_token_id = Some(eos as u32);
            // Another pad id than transformers' (EOS): it fills the rows after EOS
            // (`until_eos` compares up to it) and must not change when the search stops.
            o.request.pad_token_id = Some(eos as u32 + 1);
            o.request.num_return_sequences = num_beams;
            let out = Generation {
                model: model.as_ref(),
                prefix: None,
                opts: &o,
                ids: &ids,
                pad: None,
            }
            .generate()
            .expect(&what);
            let want: Vec<Vec<u64>> = serde_json::from_value(s["sequences"].clone()).unwrap();
            assert_eq!(out.tokens.len(), want.len(), "{what}: rows");
            for (row, (ours, theirs)) in out.tokens.iter().zip(&want).enumerate() {
                let ours: Vec<u64> = ours.iter().map(|t| *t as u64).collect();
                // Rows of 5 tokens where every beam was done early (4 of the 18
                // settings), else 8.
                assert_eq!(ours.len(), theirs.len(), "{what}: row {row}'s length");
                assert_eq!(
                    until_eos(&ours, eos),
                    until_eos(theirs, eos),
                    "{what}: returned row {row}"
                );
            }
            let scores = out.scores.expect("beam scores");
            let want: Vec<f64> = serde_json::from_value(s["sequences_scores"].clone()).unwrap();
            for (row, (a, b)) in scores.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "{what}: score of row {row}: ours {a}, transformers {b}"
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 18);
}
