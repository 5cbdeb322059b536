//! Phi-3 (the Llama decoder with fused `qkv_proj` and `gate_up_proj`): numerical parity
//! with candle-transformers' `phi3` on the same seeded weights, without a prefix (the
//! tiny config as it is: 4 heads over 2 KV heads, so the fused `qkv_proj` splits
//! unevenly); `config.json` with transformers' defaults; parameter names.
//! (candle-transformers 0.11 has no GPT-NeoX.)

use crate::common::{build_with_weights, logits_with, parity_prompt, worst_diff};

use candle_core::{DType, Device};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::phi3 as ct_phi3;
use prefix_harness::engine::cache::CacheMode;
use prefix_harness::engine::model::{phi3, weights, ModelConfig};

const SEED: u64 = 7;
const TOL: f32 = 1e-4;

#[test]
fn phi3_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = phi3::Config::tiny();
    let mc = ModelConfig::Phi3(cfg.clone());
    let (model, map) = build_with_weights(&mc, SEED, &dev);
    let ids = parity_prompt(&dev); // [2, 7]
                                   // ours: [B, S, V]
    let ours = logits_with(model.as_ref(), None, CacheMode::Dynamic, &ids);
    let ccfg = ct_phi3::Config {
        vocab_size: cfg.core.sizes.vocab_size,
        hidden_act: Activation::Silu,
        hidden_size: cfg.core.sizes.hidden_size,
        intermediate_size: cfg.core.sizes.intermediate_size,
        num_hidden_layers: cfg.core.sizes.num_hidden_layers,
        num_attention_heads: cfg.core.sizes.num_attention_heads,
        num_key_value_heads: cfg.core.num_key_value_heads.unwrap(),
        rms_norm_eps: cfg.core.rms_norm_eps,
        rope_theta: cfg.core.rope.rope_theta,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.core.sizes.max_position_embeddings,
        original_max_position_embeddings: None,
        partial_rotary_factor: None,
        tie_word_embeddings: cfg.core.sizes.tie_word_embeddings,
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut theirs = ct_phi3::Model::new(&ccfg, vb).unwrap();
    let worst = worst_diff(&ours, &ids, |x, off| {
        if off == 0 {
            theirs.clear_kv_cache();
        }
        theirs.forward(x, off).unwrap()
    });
    println!("phi3 no-prefix parity vs candle-transformers phi3: max abs diff {worst:e}");
    assert!(worst <= TOL, "max abs diff {worst} > {TOL}");
}

#[test]
fn phi3_config_json_defaults_and_refusals() {
    let parse = |s: &str| match ModelConfig::from_hf_json(s) {
        Ok(ModelConfig::Phi3(c)) => c,
        other => panic!("{other:?}"),
    };
    // Absent: Phi-3-mini-4k's defaults; num_key_value_heads = num_attention_heads.
    let d = parse(r#"{"model_type": "phi3", "num_hidden_layers": 2}"#);
    assert_eq!(
        (
            d.core.sizes.vocab_size,
            d.core.sizes.hidden_size,
            d.core.sizes.intermediate_size
        ),
        (32_064, 3072, 8192)
    );
    assert_eq!(d.core.rms_norm_eps, 1e-5);
    assert_eq!(d.sliding_window, None);
    let g = ModelConfig::Phi3(d).geometry();
    assert_eq!(
        (g.num_attention_heads, g.num_kv_heads, g.head_dim),
        (32, 32, 96)
    );
    // A window applies to every layer.
    let w = parse(r#"{"model_type": "phi3", "num_hidden_layers": 2, "sliding_window": 2047}"#);
    assert_eq!(w.decoder().1.windows, vec![Some(2047); 2]);
    // Partial rotary and longrope are refused, not silently computed as full RoPE.
    for bad in [
        r#"{"model_type": "phi3", "partial_rotary_factor": 0.75}"#,
        r#"{"model_type": "phi3", "rope_scaling": {"type": "longrope", "factor": 2.0}}"#,
    ] {
        let err = match ModelConfig::from_hf_json(bad) {
            Err(e) => e.to_string(),
            Ok(mc) => mc
                .build(weights::seeded(SEED, DType::F32, &Device::Cpu))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        };
        assert!(err.contains("phi3"), "{bad}: {err}");
    }
}

#[test]
fn phi3_reads_fused_parameter_names() {
    let names: Vec<String> =
        weights::materialize(&ModelConfig::Phi3(phi3::Config::tiny()), SEED, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    let has = |n: &str| names.iter().any(|k| k == n);
    assert!(has("model.layers.0.self_attn.qkv_proj.weight"), "{names:?}");
    assert!(has("model.layers.2.mlp.gate_up_proj.weight"), "{names:?}");
    assert!(has("lm_head.weight"), "{names:?}");
    assert!(!names
        .iter()
        .any(|k| k.contains("q_proj") || k.contains("gate_proj")));
}
