//! Benchmark M2 (issue 9), the harness side: a compute-bound prefix-tuning step and
//! greedy decoding on a seeded Llama (hidden 512, 4 layers, 8 heads / 2 KV heads,
//! head_dim 64, intermediate 1024, vocab 4096), batch 8, sequence 128, P 32.
//!
//!     cargo run --release --example bench_m2            # what ci/bench/run.sh runs
//!     cargo run --release --example bench_m2 -- --steps 5 --tokens 32 --fused
//!
//! A training step = forward through `train::batch_logits_in` (prefix in a fresh `none`
//! cache), `train::masked_cross_entropy`, `backward`, and AdamW over the prefix
//! variables only. Generation = `generate::greedy` with a dynamic cache, the path
//! `prefix-harness run` takes (`--fused`: in `Ops::Fused`, candle-nn's softmax / norm
//! kernels instead of the crate's own; measured equal within noise).
//! Also measures candle's 1024^3 f32 matmul peak in the same process. Prints one
//! `key=value` line per number (ci/bench/peft_m2.py prints the same keys).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::generate::{greedy, DecodeOptions};
use prefix_harness::engine::model::{llama, weights, ModelConfig, Ops};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::engine::train::{batch_logits_in, masked_cross_entropy};

#[path = "bench_common/mod.rs"]
mod bench_common;
use bench_common::{arg, flag, median, synthetic_batch};

const HIDDEN: usize = 512;
const LAYERS: usize = 4;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const INTER: usize = 1024;
const VOCAB: usize = 4096;
const B: usize = 8;
const S: usize = 128;
const P: usize = 32;

/// Matmul FLOPs of one forward pass over `t` new tokens per row attending to `k` keys
/// (prefix + past + new), LM head on `head_rows` positions per row.
fn forward_flops(t: usize, k: usize, head_rows: usize) -> f64 {
    let tok = (B * t) as f64;
    let (h, kvd, i) = (HIDDEN as f64, (KV_HEADS * HEAD_DIM) as f64, INTER as f64);
    let linear = 2.0 * tok * (h * h * 2.0 + h * kvd * 2.0 + 3.0 * h * i);
    let attn = 2.0 * 2.0 * (B * HEADS * t * k * HEAD_DIM) as f64;
    let head = 2.0 * (B * head_rows) as f64 * h * VOCAB as f64;
    LAYERS as f64 * (linear + attn) + head
}

fn matmul_peak(dev: &Device) -> candle_core::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let _ = a.matmul(&b)?; // warm-up
    let mut times = vec![];
    for _ in 0..10 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.dims();
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / median(&mut times) / 1e9)
}

fn main() -> anyhow::Result<()> {
    // As the CLI does with --jobs 1: all cores for one case, freed memory reused.
    prefix_harness::harness::run::prepare_process(1);
    let steps = arg("--steps", 5);
    let tokens = arg("--tokens", 32);
    let fused = flag("--fused");
    let skip_train = flag("--no-train");
    let skip_gen = flag("--no-gen");
    let dev = Device::Cpu;

    let peak = matmul_peak(&dev)?;
    println!("threads={}", candle_core::utils::get_num_threads());
    println!("matmul_peak_gflops={peak:.1}");

    let mut cfg = llama::Config::tiny();
    cfg.core.sizes.vocab_size = VOCAB;
    cfg.core.sizes.hidden_size = HIDDEN;
    cfg.core.sizes.intermediate_size = INTER;
    cfg.core.sizes.num_hidden_layers = LAYERS;
    cfg.core.sizes.num_attention_heads = HEADS;
    cfg.core.num_key_value_heads = Some(KV_HEADS);
    cfg.head_dim = Some(HEAD_DIM);
    cfg.core.sizes.max_position_embeddings = 1024;
    let cfg = ModelConfig::Llama(cfg);
    let model = cfg.build(weights::seeded(7, DType::F32, &dev))?;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(P), &model.geometry(), &dev)?;

    let batch = synthetic_batch(B, S, VOCAB, &dev)?; // ids, labels: [B, S]
    let ids = batch.ids.clone(); // [B, S]

    if !skip_train {
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
        let (mut fwd_t, mut bwd_t) = (vec![], vec![]);
        for step in 0..steps + 1 {
            let t = Instant::now();
            let logits = batch_logits_in(model.as_ref(), &prefix, &batch, &none)?;
            let loss = masked_cross_entropy(&logits, &batch.labels)?;
            let value = loss.to_scalar::<f32>()?;
            let t_fwd = t.elapsed().as_secs_f64();
            let grads = loss.backward()?;
            let t_bwd = t.elapsed().as_secs_f64() - t_fwd;
            opt.step(&grads)?;
            let el = t.elapsed().as_secs_f64();
            eprintln!(
                "step {step}: loss {value:.4}, {:.3} s (forward {t_fwd:.3}, backward {t_bwd:.3})",
                el
            );
            if step > 0 {
                // step 0 is a warm-up (allocator, thread pool)
                times.push(el);
                fwd_t.push(t_fwd);
                bwd_t.push(t_bwd);
            }
        }
        let step_s = median(&mut times);
        // Useful work: forward + the backward pass to the activations (2x forward);
        // neither side computes gradients of the frozen weights (ours: nn::Linear).
        let flops = 2.0 * forward_flops(S, P + S, S);
        println!("train_step_s={step_s:.4}");
        println!("train_forward_s={:.4}", median(&mut fwd_t));
        println!("train_backward_s={:.4}", median(&mut bwd_t));
        println!("train_gflop={:.2}", flops / 1e9);
        println!("train_gflops={:.1}", flops / step_s / 1e9);
    }

    if !skip_gen {
        let run = |n: usize| -> anyhow::Result<f64> {
            let mut opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), n);
            if fused {
                opts.ops = Ops::Fused;
            }
            let t = Instant::now();
            let out = greedy(model.as_ref(), Some(&prefix), &opts, &ids, None)?;
            assert_eq!(out.tokens.len(), B);
            assert_eq!(out.tokens[0].len(), n);
            Ok(t.elapsed().as_secs_f64())
        };
        run(2)?; // warm-up
        let prefill = run(1)?;
        let total = run(tokens)?;
        let per_token = total / tokens as f64;
        let decode = (total - prefill) / (tokens - 1).max(1) as f64;
        let mut flops = forward_flops(S, P + S, 1);
        for j in 1..tokens {
            flops += forward_flops(1, P + S + j, 1);
        }
        println!("gen_fused={fused}");
        println!("gen_total_s={total:.4}");
        println!("gen_prefill_s={prefill:.4}");
        println!("gen_per_token_s={per_token:.5}");
        println!("gen_decode_per_token_s={decode:.5}");
        println!("gen_gflops={:.1}", flops / total / 1e9);
    }
    Ok(())
}
