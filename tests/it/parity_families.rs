//! Qwen2, Mistral and Qwen3 (the Llama decoder configured per family): numerical parity
//! with candle-transformers' `qwen2`, `mistral` and `qwen3` on the same seeded weights,
//! without a prefix. The tiny configs are used as they are (Qwen2: one KV head, q/k/v
//! biases, tied embeddings, rope_theta 1e6; Mistral: 8 heads over 2 KV heads; Qwen3:
//! head_dim 24 != 64 / 4, q/k norms), with no window that the prompt reaches:
//! candle-transformers' windows admit one more position than transformers' (`j + W <
//! i` masks), and the window itself is checked against transformers
//! (`scenarios/stack/`).

use crate::common::{
    build_with_weights, logits_with, max_abs_diff, parity_prompt, parse_hf_config, worst_diff,
};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::{
    gemma2 as ct_gemma2, gemma3 as ct_gemma3, mistral as ct_mistral, qwen2 as ct_qwen2,
    qwen3 as ct_qwen3,
};
use prefix_harness::engine::cache::CacheMode;
use prefix_harness::engine::model::{
    gemma2, gemma3, mistral, qwen2, qwen3, weights, Model, ModelConfig,
};

const SEED: u64 = 7;
const TOL: f32 = 1e-4;

/// Our logits `[B, S, V]` for the prompt, no prefix.
fn ours(model: &dyn Model, ids: &Tensor) -> Tensor {
    logits_with(model, None, CacheMode::Dynamic, ids)
}

/// `forward(ids, offset)` of a candle-transformers model with a KV cache, emptied at
/// offset 0 (for [`worst_diff`]).
macro_rules! stepper {
    ($theirs:ident) => {
        |x: &Tensor, off: usize| {
            if off == 0 {
                $theirs.clear_kv_cache();
            }
            $theirs.forward(x, off).unwrap()
        }
    };
}

/// Prints the largest difference from the reference `forward` (see [`worst_diff`]) and
/// checks it against `TOL`.
fn assert_parity(
    name: &str,
    ours: &Tensor,
    ids: &Tensor,
    forward: impl FnMut(&Tensor, usize) -> Tensor,
) {
    let worst = worst_diff(ours, ids, forward);
    println!("{name} no-prefix parity vs candle-transformers {name}: max abs diff {worst:e}");
    assert!(worst <= TOL, "{name}: max abs diff {worst} > {TOL}");
}

#[test]
fn qwen2_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = qwen2::Config::tiny();
    let (model, map) = build_with_weights(&ModelConfig::Qwen2(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    let ours = ours(model.as_ref(), &ids);
    let ccfg = ct_qwen2::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads.unwrap(),
        max_position_embeddings: cfg.max_position_embeddings,
        sliding_window: 4096,
        max_window_layers: cfg.max_window_layers,
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut theirs = ct_qwen2::ModelForCausalLM::new(&ccfg, vb).unwrap();
    assert_parity("qwen2", &ours, &ids, stepper!(theirs));
}

#[test]
fn mistral_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = mistral::Config {
        sliding_window: None,
        ..mistral::Config::tiny()
    };
    let (model, map) = build_with_weights(&ModelConfig::Mistral(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    let ours = ours(model.as_ref(), &ids);
    let ccfg = ct_mistral::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim,
        num_key_value_heads: cfg.num_key_value_heads.unwrap(),
        hidden_act: Activation::Silu,
        max_position_embeddings: cfg.max_position_embeddings,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        sliding_window: None,
        use_flash_attn: false,
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut theirs = ct_mistral::Model::new(&ccfg, vb).unwrap();
    assert_parity("mistral", &ours, &ids, stepper!(theirs));
}

#[test]
fn qwen3_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = qwen3::Config::tiny();
    let (model, map) = build_with_weights(&ModelConfig::Qwen3(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    let ours = ours(model.as_ref(), &ids);
    let ccfg = ct_qwen3::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        head_dim: cfg.head_dim,
        attention_bias: cfg.attention_bias,
        num_key_value_heads: cfg.num_key_value_heads.unwrap(),
        max_position_embeddings: cfg.max_position_embeddings,
        sliding_window: None,
        max_window_layers: cfg.max_window_layers,
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: Activation::Silu,
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut theirs = ct_qwen3::ModelForCausalLM::new(&ccfg, vb).unwrap();
    assert_parity("qwen3", &ours, &ids, stepper!(theirs));
}

// ---------------------------------------------------------------------------------
// Gemma 2. candle-transformers' gemma2 differs from transformers in two places, which
// these tests work around rather than copy:
// - it scales the scores by `head_dim ** -0.5` and ignores `query_pre_attn_scalar`:
//   its copy of the weights has `q_proj` multiplied by `sqrt(head_dim /
//   query_pre_attn_scalar)` (RoPE is linear, so `q k^T / sqrt(head_dim)` becomes
//   transformers' `q k^T / sqrt(query_pre_attn_scalar)`);
// - it applies one `sliding_window` to every layer (not the alternating layers),
//   admits W + 1 keys (`j + W < i` masks), and only in a multi-token pass (a one-token
//   step sees the whole cache): the alternating layers are checked against
//   transformers (`scenarios/stack/gemma2.yaml`), the window's arithmetic here with
//   every layer sliding, W - 1 for candle, over the whole prompt.

/// candle-transformers' gemma2 on `cfg`'s seeded weights `map` (with `q_proj`
/// rescaled, see above) and `window` in every layer.
fn candle_gemma2(
    cfg: &gemma2::Config,
    map: &HashMap<String, Tensor>,
    window: Option<usize>,
    dev: &Device,
) -> ct_gemma2::Model {
    let ccfg = ct_gemma2::Config {
        attention_bias: cfg.attention_bias,
        head_dim: cfg.head_dim,
        hidden_activation: Activation::GeluPytorchTanh,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_attention_heads: cfg.num_attention_heads,
        num_hidden_layers: cfg.num_hidden_layers,
        num_key_value_heads: cfg.num_key_value_heads,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        vocab_size: cfg.vocab_size,
        final_logit_softcapping: cfg.final_logit_softcapping,
        attn_logit_softcapping: cfg.attn_logit_softcapping,
        query_pre_attn_scalar: cfg.query_pre_attn_scalar,
        sliding_window: window,
        max_position_embeddings: cfg.max_position_embeddings,
    };
    let q_factor = (cfg.head_dim as f64 / cfg.query_pre_attn_scalar as f64).sqrt();
    let mut map = map.clone();
    for (name, t) in map.iter_mut() {
        if name.ends_with("self_attn.q_proj.weight") {
            *t = (&*t * q_factor).unwrap();
        }
    }
    let vb = VarBuilder::from_tensors(map, DType::F32, dev);
    ct_gemma2::Model::new(false, &ccfg, vb).unwrap()
}

/// The tiny config as it is (head_dim 24 != 64 / 4, query_pre_attn_scalar 16, both
/// soft-caps, tied embeddings); its window of 8 is longer than the 7-token prompt.
#[test]
fn gemma2_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = gemma2::Config::tiny();
    let (model, map) = build_with_weights(&ModelConfig::Gemma2(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    assert!(ids.dim(1).unwrap() <= cfg.sliding_window.unwrap());
    let ours = ours(model.as_ref(), &ids);
    let mut theirs = candle_gemma2(&cfg, &map, None, &dev);
    assert_parity("gemma2", &ours, &ids, stepper!(theirs));
}

/// Every layer sliding with a window of 3 (keys in (p - 3, p]) over the 7-token
/// prompt, against candle-transformers' window of 2 (its `j + 2 < i` masks admit the
/// same 3 keys), whole-prompt pass; and the window does change the logits.
#[test]
fn gemma2_sliding_window_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = gemma2::Config {
        sliding_window: Some(3),
        layer_types: Some(vec!["sliding_attention".into(); 3]),
        ..gemma2::Config::tiny()
    };
    let (model, map) = build_with_weights(&ModelConfig::Gemma2(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    let s = ids.dim(1).unwrap();
    let ours = ours(model.as_ref(), &ids).narrow(1, s - 1, 1).unwrap();
    let mut theirs = candle_gemma2(&cfg, &map, Some(2), &dev);
    let worst = max_abs_diff(&ours, &theirs.forward(&ids, 0).unwrap());
    println!("gemma2 all-sliding (W 3) parity vs candle-transformers gemma2 (W 2): max abs diff {worst:e}");
    assert!(worst <= TOL, "max abs diff {worst} > {TOL}");
    let full = gemma2::Config {
        sliding_window: None,
        ..cfg
    };
    let (model, _) = build_with_weights(&ModelConfig::Gemma2(full), SEED, &dev);
    let unwindowed = ours_last(model.as_ref(), &ids);
    let moved = max_abs_diff(&ours, &unwindowed);
    assert!(
        moved > 1e-2,
        "the window of 3 moved the logits by only {moved}"
    );
}

/// Our logits at the last position `[B, 1, V]`.
fn ours_last(model: &dyn Model, ids: &Tensor) -> Tensor {
    let s = ids.dim(1).unwrap();
    ours(model, ids).narrow(1, s - 1, 1).unwrap()
}

// ---------------------------------------------------------------------------------
// config.json parsing and parameter names

/// The windows of every layer of a Llama-like config.
fn windows(mc: &ModelConfig) -> Vec<Option<usize>> {
    mc.decoder().expect("a Llama-like family").1.windows
}

#[test]
fn qwen2_config_json_defaults_and_sliding_layers() {
    // A Qwen2.5-style checkpoint: GQA 14 over 2, tied embeddings, window off.
    let mc = parse_hf_config(
        r#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 32768,
        "max_window_layers": 21, "torch_dtype": "bfloat16", "bos_token_id": 151643}"#,
    );
    let g = mc.geometry();
    assert_eq!((g.num_kv_heads, g.head_dim, g.num_layers), (2, 64, 24));
    assert!(
        windows(&mc).iter().all(Option::is_none),
        "use_sliding_window is off"
    );
    let (cfg, block) = mc.decoder().unwrap();
    assert!(block.qkv_bias && !block.o_bias && !block.qk_norm);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.theta(), 1e6);

    // Nothing but model_type: transformers' defaults (32 KV heads, not the heads).
    let ModelConfig::Qwen2(d) = parse_hf_config(r#"{"model_type": "qwen2"}"#) else {
        panic!("qwen2")
    };
    assert_eq!(
        (d.num_key_value_heads, d.sliding_window, d.max_window_layers),
        (Some(32), Some(4096), 28)
    );
    assert_eq!(
        (d.vocab_size, d.hidden_size, d.num_hidden_layers),
        (151_936, 4096, 32)
    );

    // With use_sliding_window, layers from max_window_layers on slide ...
    let on = r#"{"model_type": "qwen2", "num_hidden_layers": 3, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "use_sliding_window": true, "sliding_window": 8,
        "max_window_layers": 1}"#;
    assert_eq!(windows(&parse_hf_config(on)), [None, Some(8), Some(8)]);
    // ... unless layer_types says which.
    let typed = on.replace(
        r#""max_window_layers": 1"#,
        r#""layer_types": ["sliding_attention", "full_attention", "sliding_attention"]"#,
    );
    assert_eq!(windows(&parse_hf_config(&typed)), [Some(8), None, Some(8)]);
    // A null window slides nothing.
    let null = on.replace(r#""sliding_window": 8"#, r#""sliding_window": null"#);
    assert_eq!(windows(&parse_hf_config(&null)), [None, None, None]);
}

#[test]
fn mistral_config_json_window_and_head_dim() {
    // Mistral-Nemo-style explicit head_dim (128 != 5120 / 32); a null window.
    let mc = parse_hf_config(
        r#"{"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 2,
        "vocab_size": 131072, "sliding_window": null, "rope_theta": 1000000.0}"#,
    );
    assert_eq!(
        (mc.geometry().num_kv_heads, mc.geometry().head_dim),
        (8, 128)
    );
    assert_eq!(windows(&mc), [None, None]);
    let (_, block) = mc.decoder().unwrap();
    assert!(!block.qkv_bias && !block.o_bias && !block.qk_norm);
    // Absent: Mistral 7B v0.1's defaults (window 4096 in every layer, 8 KV heads).
    let d = parse_hf_config(r#"{"model_type": "mistral", "num_hidden_layers": 2}"#);
    assert_eq!(windows(&d), [Some(4096), Some(4096)]);
    assert_eq!((d.geometry().num_kv_heads, d.geometry().head_dim), (8, 128));
}

#[test]
fn qwen3_config_json_head_dim_and_bias() {
    // A Qwen3-0.6B-style config: head_dim 128 with hidden 1024 / 16 heads = 64.
    let mc = parse_hf_config(
        r#"{"model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 2,
        "intermediate_size": 3072, "vocab_size": 151936, "attention_bias": false,
        "tie_word_embeddings": true, "rope_theta": 1000000, "use_sliding_window": false,
        "sliding_window": null, "max_window_layers": 28}"#,
    );
    assert_eq!(
        (mc.geometry().num_kv_heads, mc.geometry().head_dim),
        (8, 128)
    );
    let (_, block) = mc.decoder().unwrap();
    assert!(block.qk_norm && !block.qkv_bias && !block.o_bias);
    // attention_bias puts biases on q/k/v and o.
    let biased = parse_hf_config(
        r#"{"model_type": "qwen3", "num_hidden_layers": 1, "attention_bias": true}"#,
    );
    let (_, block) = biased.decoder().unwrap();
    assert!(block.qkv_bias && block.o_bias);
    let ModelConfig::Qwen3(d) = parse_hf_config(r#"{"model_type": "qwen3"}"#) else {
        panic!("qwen3")
    };
    assert_eq!((d.head_dim, d.num_key_value_heads), (128, Some(32)));
}

#[test]
fn parameter_names_follow_the_transformers_classes() {
    let dev = Device::Cpu;
    let names = |mc: ModelConfig| weights::materialize(&mc, SEED, &dev).unwrap();
    let q2 = names(ModelConfig::Qwen2(qwen2::Config::tiny()));
    for n in ["q_proj", "k_proj", "v_proj"] {
        let b = &q2[&format!("model.layers.2.self_attn.{n}.bias")];
        assert_eq!(b.dims().len(), 1, "{n}");
    }
    assert!(!q2.contains_key("model.layers.0.self_attn.o_proj.bias"));
    assert!(!q2.contains_key("lm_head.weight"), "tied embeddings");
    let q3 = names(ModelConfig::Qwen3(qwen3::Config::tiny()));
    for n in ["q_norm", "k_norm"] {
        assert_eq!(
            q3[&format!("model.layers.1.self_attn.{n}.weight")].dims(),
            [24]
        );
    }
    assert!(!q3.keys().any(|k| k.ends_with(".bias")));
    let m = names(ModelConfig::Mistral(mistral::Config::tiny()));
    assert!(m.contains_key("lm_head.weight"));
    assert!(!m
        .keys()
        .any(|k| k.ends_with(".bias") || k.contains("_norm.")));
}

/// A Llama 3.x `rope_scaling` (transformers < 5's spelling) loads, and the llama3
/// scaling changes the logits once positions reach the scaled frequencies.
#[test]
fn llama3_rope_scaling_loads_and_applies() {
    let dev = Device::Cpu;
    let base = r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 24, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": ROPE}"#;
    let scaled = base.replace(
        "ROPE",
        r#"{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 4}"#,
    );
    let plain = base.replace("ROPE", "null");
    let ids = parity_prompt(&dev);
    let logits = |json: &str| {
        let mc = parse_hf_config(json);
        let model = mc.build(weights::seeded(SEED, DType::F32, &dev)).unwrap();
        ours(model.as_ref(), &ids)
    };
    let (a, b) = (logits(&scaled), logits(&plain));
    // Position 0 is not rotated; later positions are, with other frequencies.
    assert_eq!(
        max_abs_diff(&a.narrow(1, 0, 1).unwrap(), &b.narrow(1, 0, 1).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&a, &b) > 1e-3);
}

// ---------------------------------------------------------------------------------
// Gemma 3. candle-transformers' gemma3 scales by `head_dim ** -0.5` (compensated in
// the reference's `q_norm` weights: its (1 + w) becomes c (1 + w), c = sqrt(head_dim /
// query_pre_attn_scalar), which scales the queries after the norm, before RoPE), has
// no RoPE scaling (the global layers' linear x2 of the tiny config is dropped here;
// it is checked against transformers in `scenarios/stack/gemma3.yaml`), and its
// windows admit one key more (`j + W < i`).

/// candle-transformers' gemma3 on `cfg`'s seeded weights `map`, with `window` and
/// `pattern` as its `sliding_window` and `sliding_window_pattern`.
fn candle_gemma3(
    cfg: &gemma3::Config,
    map: &HashMap<String, Tensor>,
    window: usize,
    pattern: usize,
    dev: &Device,
) -> ct_gemma3::Model {
    let ccfg = ct_gemma3::Config {
        attention_bias: cfg.attention_bias,
        head_dim: cfg.head_dim,
        hidden_activation: Activation::GeluPytorchTanh,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_attention_heads: cfg.num_attention_heads,
        num_hidden_layers: cfg.num_hidden_layers,
        num_key_value_heads: cfg.num_key_value_heads,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        rope_local_base_freq: cfg.rope_local_base_freq,
        vocab_size: cfg.vocab_size,
        final_logit_softcapping: cfg.final_logit_softcapping,
        attn_logit_softcapping: cfg.attn_logit_softcapping,
        query_pre_attn_scalar: cfg.query_pre_attn_scalar,
        sliding_window: window,
        sliding_window_pattern: pattern,
        max_position_embeddings: cfg.max_position_embeddings,
    };
    let c = (cfg.head_dim as f64 / cfg.query_pre_attn_scalar as f64).sqrt();
    let mut map = map.clone();
    for (name, t) in map.iter_mut() {
        if name.ends_with("self_attn.q_norm.weight") {
            // [D]: c (1 + w) - 1
            *t = (((&*t + 1.0).unwrap() * c).unwrap() - 1.0).unwrap();
        }
    }
    let vb = VarBuilder::from_tensors(map, DType::F32, dev);
    ct_gemma3::Model::new(false, &ccfg, vb).unwrap()
}

/// The tiny config without RoPE scaling (see above).
fn gemma3_unscaled() -> gemma3::Config {
    gemma3::Config {
        rope_scaling: None,
        ..gemma3::Config::tiny()
    }
}

/// Tiny Gemma 3 (layers 0, 1, 3, 4 sliding with RoPE base 1e4, layer 2 global with
/// 1e6; one KV head; q/k norms) with a window of 8 that the 7-token prompt does not
/// reach, whole prompt and token by token.
#[test]
fn gemma3_no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = gemma3::Config {
        sliding_window: Some(8),
        ..gemma3_unscaled()
    };
    let (model, map) = build_with_weights(&ModelConfig::Gemma3(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    assert!(ids.dim(1).unwrap() <= 8);
    let ours = ours(model.as_ref(), &ids);
    let mut theirs = candle_gemma3(&cfg, &map, 8, 3, &dev);
    assert_parity("gemma3", &ours, &ids, stepper!(theirs));
}

/// The tiny layer pattern with a window of 3 (keys in (p - 3, p]) over the 7-token
/// prompt, against candle-transformers' window of 2 (the same 3 keys), whole-prompt
/// pass.
#[test]
fn gemma3_sliding_window_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    let cfg = gemma3::Config {
        sliding_window: Some(3),
        ..gemma3_unscaled()
    };
    let (model, map) = build_with_weights(&ModelConfig::Gemma3(cfg.clone()), SEED, &dev);
    let ids = parity_prompt(&dev);
    let ours = ours_last(model.as_ref(), &ids);
    let mut theirs = candle_gemma3(&cfg, &map, 2, 3, &dev);
    let worst = max_abs_diff(&ours, &theirs.forward(&ids, 0).unwrap());
    println!(
        "gemma3 sliding (W 3) parity vs candle-transformers gemma3 (W 2): max abs diff {worst:e}"
    );
    assert!(worst <= TOL, "max abs diff {worst} > {TOL}");
}
