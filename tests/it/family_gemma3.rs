//! Gemma 3 (text): `config.json` with transformers' defaults, `layer_types` or
//! `sliding_window_pattern`, the two RoPE bases (also transformers 5's
//! `rope_parameters` per layer type), and that each Gemma 3 piece
//! (q/k norms, `query_pre_attn_scalar`, the local RoPE base, the global RoPE scaling,
//! the windows) reaches the logits of the tiny config. Its parameter names are checked
//! with Gemma 2's (`tests/it/family_gemma2.rs`), whose decoder it shares; its logits
//! against candle-transformers (`tests/it/parity_families.rs`) and transformers +
//! PEFT (`scenarios/stack/gemma3.yaml`).

use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::model::{gemma3, weights, Family, ModelConfig};

use crate::common::{
    assert_each_change_moves_logits, family_parser, flat_logits_of, long_prompt, max_diff,
    replaced, FAMILY_SEED,
};

family_parser!(Gemma3, gemma3::Config);

fn windows(c: &gemma3::Config) -> Vec<Option<usize>> {
    c.decoder().unwrap().1.windows
}

#[test]
fn gemma3_config_json_defaults_and_layer_types() {
    // model_type gemma3_text: Gemma3ForCausalLM; `gemma3` (the multimodal model) is
    // not this family's model_type.
    assert_eq!(Family::Gemma3.model_type(), "gemma3_text");
    assert_eq!(Family::Gemma3.architecture(), "Gemma3ForCausalLM");
    let e = ModelConfig::from_hf_json(r#"{"model_type": "gemma3"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gemma3_text"), "{e}");
    // Nothing but model_type and a layer count: transformers 5's defaults, every
    // sixth layer global (sliding_window_pattern 6).
    let d = parse(r#"{"model_type": "gemma3_text", "num_hidden_layers": 7}"#);
    assert_eq!(
        (
            d.core.sizes.hidden_size,
            d.core.sizes.num_attention_heads,
            d.core.num_key_value_heads,
            d.core.head_dim,
            d.core.sizes.vocab_size
        ),
        (2304, 8, 4, 256, 262_208)
    );
    assert_eq!(d.attn.query_pre_attn_scalar, 256);
    assert_eq!(
        (
            d.caps.attn_logit_softcapping,
            d.caps.final_logit_softcapping
        ),
        (None, None)
    );
    assert!(d.core.sizes.tie_word_embeddings);
    let w = Some(4096);
    assert_eq!(windows(&d), [w, w, w, w, w, None, w]);
    let (cfg, block) = d.decoder().unwrap();
    assert!(block.qk_norm && cfg.attn.layer_types.is_some());
    // RoPE: 1e6 on the global layers, 1e4 on the sliding ones (frequency 1 of
    // 1 / theta^(2/256)).
    let (g, l) = d.inv_freqs().unwrap();
    assert_eq!(g[0], 1.0);
    assert!((g[1] - 1e6f64.powf(-2.0 / 256.0)).abs() < 1e-12);
    assert!((l[1] - 1e4f64.powf(-2.0 / 256.0)).abs() < 1e-12);
    // A gemma-3-4b-style config.json (transformers 4.5x): explicit pattern,
    // rope_scaling linear x8 on the global layers only, head_dim 256 != 2560 / 8.
    let c = parse(
        r#"{"model_type": "gemma3_text", "hidden_size": 2560, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "num_hidden_layers": 4,
        "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 2,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "final_logit_softcapping": null, "attn_logit_softcapping": null}"#,
    );
    assert_eq!(windows(&c), [Some(1024), None, Some(1024), None]);
    let (g8, l8) = c.inv_freqs().unwrap();
    assert!((g8[1] - g[1] / 8.0).abs() < 1e-12);
    assert!((l8[1] - l[1]).abs() < 1e-12);
    // transformers 5 writes layer_types and rope_parameters per layer type.
    let t5 = parse(
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 3,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
        "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default",
        "rope_theta": 10000.0}}, "sliding_window": 512}"#,
    );
    assert_eq!(windows(&t5), [None, Some(512), None]);
    assert_eq!(t5.inv_freqs().unwrap(), (g8, l8));
    // Refused, naming gemma3: wrong layer_types length, another rope type, pattern 0,
    // odd head_dim, bidirectional attention.
    for bad in [
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["full_attention"]}"#,
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}"#,
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 1, "sliding_window_pattern": 0}"#,
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 1, "head_dim": 25}"#,
        r#"{"model_type": "gemma3_text", "num_hidden_layers": 1, "use_bidirectional_attention": true}"#,
    ] {
        let e = ModelConfig::from_hf_json(bad).unwrap_err().to_string();
        assert!(e.contains("gemma3"), "{bad}: {e}");
    }
}

#[test]
fn gemma3_tiny_geometry_is_awkward() {
    let t = gemma3::Config::tiny();
    let g = ModelConfig::Gemma3(t.clone()).geometry();
    assert_eq!((g.num_layers, g.num_kv_heads, g.head_dim), (5, 1, 24));
    assert_ne!(g.head_dim, g.hidden_size / g.num_attention_heads);
    assert!(g.num_layers % 2 == 1);
    assert_eq!(windows(&t), [Some(6), Some(6), None, Some(6), Some(6)]);
}

/// Each of Gemma 3's own pieces changes the tiny model's logits: without it a test
/// against a reference that lacks it too would pass.
#[test]
fn gemma3_norms_scalar_ropes_and_windows_reach_the_logits() {
    assert_each_change_moves_logits(
        gemma3::Config::tiny,
        ModelConfig::Gemma3,
        // [2, 12], longer than the tiny window
        &long_prompt(),
        1e-3,
        &[
            ("query_pre_attn_scalar = head_dim", |c| {
                c.attn.query_pre_attn_scalar = 24
            }),
            ("sliding layers with the global RoPE base", |c| {
                c.rope_local_base_freq = 1_000_000.0
            }),
            ("no linear scaling on the global layers", |c| {
                c.rope_scaling = None
            }),
            ("no window", |c| c.attn.sliding_window = None),
            ("every layer global", |c| c.sliding_window_pattern = Some(1)),
            ("attention soft-cap 2", |c| {
                c.caps.attn_logit_softcapping = Some(2.0)
            }),
        ],
    );
}

/// The q/k norms are read and applied: the model built from weights whose q_norm is
/// replaced by zeros (a (1 + 0) norm, the scale 1) gives other logits.
#[test]
fn gemma3_qk_norm_weights_reach_the_logits() {
    let dev = Device::Cpu;
    let mc = ModelConfig::Gemma3(gemma3::Config::tiny());
    let ids = Tensor::new(&[[1u32, 17, 42, 99, 3, 250, 8, 64, 9, 31]], &dev).unwrap();
    let run = |map: std::collections::HashMap<String, Tensor>| -> Vec<f32> {
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &dev);
        flat_logits_of(mc.build(vb).unwrap().as_ref(), &ids)
    };
    let map = weights::materialize(&mc, FAMILY_SEED, &dev).unwrap();
    let base = run(map.clone());
    for norm in ["q_norm", "k_norm"] {
        let m = replaced(&map, &format!("self_attn.{norm}.weight"), |t| {
            t.zeros_like().unwrap()
        });
        let d = max_diff(&base, &run(m));
        assert!(d > 1e-3, "{norm}: logits moved by only {d}");
    }
}
