//! No-prefix parity with candle-transformers' GPT-BigCode (multi-query attention) on
//! the same weights: our logits equal `candle_transformers::models::bigcode` to 1e-4,
//! for a full prefill and for token-by-token decoding through its fused K|V cache
//! (the `legacy` layout of our cache).

use crate::common::*;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bigcode;
use prefix_harness::engine::cache::CacheMode;
use prefix_harness::engine::model::{gpt_bigcode, weights, ModelConfig};

fn theirs(cfg: &gpt_bigcode::Config) -> bigcode::GPTBigCode {
    let map =
        weights::materialize(&ModelConfig::GptBigcode(cfg.clone()), SEED, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    let c = bigcode::Config {
        vocab_size: cfg.gpt2.vocab_size,
        max_position_embeddings: cfg.gpt2.n_positions,
        num_hidden_layers: cfg.gpt2.n_layer,
        hidden_size: cfg.gpt2.n_embd,
        layer_norm_epsilon: cfg.gpt2.layer_norm_epsilon,
        n_inner: cfg.gpt2.n_inner,
        num_attention_heads: cfg.gpt2.n_head,
        multi_query: cfg.multi_query,
        use_cache: true,
    };
    bigcode::GPTBigCode::load(vb, c).expect("candle-transformers bigcode loads our weights")
}

#[test]
fn bigcode_logits_match_candle_transformers_for_prefill_and_cached_decoding() {
    let cfg = gpt_bigcode::Config::tiny();
    let ours = tiny_model(prefix_harness::engine::model::Family::GptBigcode);
    let ids = prompt(2, 9); // [2, 9]
    let logits = logits_with(ours.as_ref(), None, CacheMode::Dynamic, &ids);
    // Theirs returns the last position's logits [B, V]; feed it token by token so every
    // position is compared, through its fused K|V cache.
    let mut model = theirs(&cfg);
    let mut worst = 0f32;
    for t in 0..9 {
        let step = ids.narrow(1, t, 1).unwrap();
        let theirs_t = model.forward(&step, t).unwrap(); // [B, V]
        let ours_t = logits.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        worst = worst.max(max_abs_diff(&ours_t, &theirs_t));
    }
    // And a fresh full prefill (their attention mask path over 9 positions).
    let mut fresh = theirs(&cfg);
    let last = fresh.forward(&ids, 0).unwrap();
    let ours_last = logits.narrow(1, 8, 1).unwrap().squeeze(1).unwrap();
    worst = worst.max(max_abs_diff(&ours_last, &last));
    println!("gpt_bigcode vs candle-transformers: max abs diff {worst:e}");
    assert!(worst <= 1e-4, "max abs diff {worst}");
}
