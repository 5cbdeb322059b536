//! Benchmark M3 (issue 18), the harness side, real size: a seeded Qwen2 with
//! Qwen2.5-0.5B's geometry (hidden 896, 24 layers, 14 query heads over 2 KV heads,
//! head_dim 64, intermediate 4864, vocab 151936, tied embeddings), prefix P 32,
//! batch 4 x sequence 128: build the model, 10 AdamW steps on the prefix, 32 greedy
//! tokens with a dynamic cache (`generate::greedy`, the path `prefix-harness run`
//! takes). `ci/bench/peft_m3.py` does the same work with PEFT + transformers.
//!
//!     cargo run --release --example bench_m3                # what ci/bench/run.sh runs
//!     cargo run --release --example bench_m3 -- --layers 2 --steps 2 --tokens 4
//!
//! Prints one `key=value` line per number (the Python side prints the same keys):
//! `load_s` (building the model), `first_step_s`, `step_median_s` (steps 2..),
//! `train_s`, `gen_s`, `work_s`. Whole-process wall time and peak RSS come from
//! `/usr/bin/time -v` in `ci/bench/run.sh`.

use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::generate::{greedy, DecodeOptions};
use prefix_harness::engine::model::{qwen2, weights, ModelConfig};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::engine::train::{batch_logits_in, masked_cross_entropy};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{arg, median, synthetic_batch};

const B: usize = 4;
const S: usize = 128;
const P: usize = 32;

fn main() -> anyhow::Result<()> {
    // As the CLI does with --jobs 1: all cores for one case.
    prefix_harness::harness::run::prepare_process(1);
    let layers = arg("--layers", 24);
    let steps = arg("--steps", 10);
    let tokens = arg("--tokens", 32);
    let dev = Device::Cpu;
    let t0 = Instant::now();

    // Qwen2.5-0.5B's config.json, as far as the geometry goes.
    let mut cfg = qwen2::Config::tiny();
    cfg.core.sizes.vocab_size = 151_936;
    cfg.core.sizes.hidden_size = 896;
    cfg.core.sizes.intermediate_size = 4864;
    cfg.core.sizes.num_hidden_layers = layers;
    cfg.core.sizes.num_attention_heads = 14;
    cfg.core.num_key_value_heads = Some(2);
    cfg.core.sizes.max_position_embeddings = 32_768;
    cfg.core.rope.rope_theta = 1_000_000.0;
    cfg.core.sizes.tie_word_embeddings = true;
    let vocab = cfg.core.sizes.vocab_size;
    let model = ModelConfig::Qwen2(cfg).build(weights::seeded(7, DType::F32, &dev))?;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(P), &model.geometry(), &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    println!("threads={}", candle_core::utils::get_num_threads());
    println!("layers={layers}");
    println!("load_s={load_s:.3}");

    let batch = synthetic_batch(B, S, vocab, &dev)?; // ids, labels: [B, S]
    let ids = batch.ids.clone(); // [B, S]

    let t_train = Instant::now();
    let vars = prefix.vars();
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: 1e-2,
            ..ParamsAdamW::default()
        },
    )?;
    let none = CacheConfig::new(CacheMode::None);
    let mut times = vec![];
    for step in 0..steps {
        let t = Instant::now();
        let logits = batch_logits_in(model.as_ref(), &prefix, &batch, &none)?; // [B, S, V]
        let loss = masked_cross_entropy(&logits, &batch.labels)?;
        let value = loss.to_scalar::<f32>()?;
        let t_fwd = t.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        opt.step(&grads)?;
        let el = t.elapsed().as_secs_f64();
        eprintln!("step {step}: loss {value:.4}, {el:.3} s (forward {t_fwd:.3})");
        times.push(el);
    }
    let train_s = t_train.elapsed().as_secs_f64();
    let first = times.first().copied().unwrap_or(f64::NAN);
    println!("first_step_s={first:.3}");
    let later = 1.min(times.len());
    println!("step_median_s={:.3}", median(&mut times[later..]));
    println!("train_s={train_s:.3}");

    let t_gen = Instant::now();
    let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), tokens);
    let out = greedy(model.as_ref(), Some(&prefix), &opts, &ids, None)?;
    assert_eq!(out.tokens.len(), B);
    assert_eq!(out.tokens[0].len(), tokens);
    println!("gen_s={:.3}", t_gen.elapsed().as_secs_f64());
    println!("work_s={:.3}", t0.elapsed().as_secs_f64());
    Ok(())
}
