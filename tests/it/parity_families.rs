//! Qwen2, Mistral and Qwen3 (the Llama decoder configured per family): numerical parity
//! with candle-transformers' `qwen2`, `mistral` and `qwen3` on the same seeded weights,
//! without a prefix. The tiny configs are used as they are (Qwen2: one KV head, q/k/v
//! biases, tied embeddings, rope_theta 1e6; Mistral: 8 heads over 2 KV heads; Qwen3:
//! head_dim 24 != 64 / 4, q/k norms), with no window that the prompt reaches:
//! candle-transformers' windows admit one more position than transformers' (`j + W <
//! i` masks), and the window itself is checked against transformers
//! (`scenarios/stack/`).

use crate::common::{
    build_with_weights, logits_with, max_abs_diff, parity_prompt, parse_hf_config, replaced,
    worst_diff,
};

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
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

/// Our model of `mc` seeded with `SEED`: its logits `[B, S, V]` on the parity prompt
/// (no prefix), the weights it was built from (for the reference), and the prompt
/// `[B, S]`.
fn ours_seeded(mc: &ModelConfig) -> (Tensor, HashMap<String, Tensor>, Tensor) {
    let dev = Device::Cpu;
    let (model, map) = build_with_weights(mc, SEED, &dev);
    let ids = parity_prompt(&dev);
    (ours(model.as_ref(), &ids), map, ids)
}

/// Prints the largest difference between our last-position logits `[B, 1, V]` and a
/// reference's whole-prompt pass (`what` names both) and checks it against `TOL`.
fn assert_last_position_parity(what: &str, ours: &Tensor, theirs: &Tensor) {
    let worst = max_abs_diff(ours, theirs);
    println!("{what}: max abs diff {worst:e}");
    assert!(worst <= TOL, "max abs diff {worst} > {TOL}");
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

/// candle-transformers' config `C` of one of our configs: `ours` as `config.json` (both
/// read transformers' field names; candle ignores the fields it has not) with
/// `overrides` on top (what candle-transformers models differently, and the activation,
/// which the reference sets itself).
fn candle_config<C: DeserializeOwned>(ours: &impl Serialize, overrides: Value) -> C {
    let mut v = serde_json::to_value(ours).expect("our config as JSON");
    let (Value::Object(fields), Value::Object(over)) = (&mut v, overrides) else {
        panic!("configs are JSON objects")
    };
    fields.extend(over);
    serde_json::from_value(v).expect("candle-transformers reads the config")
}

/// The Llama-like families: one `#[test]` per row, our model of the tiny config against
/// candle-transformers' model of the same config (see [`candle_config`]) on the same
/// seeded weights, whole prompt and token by token.
macro_rules! llama_like_parity {
    ($($test:ident: $family:ident($cfg:expr) vs $theirs:path, $overrides:tt;)*) => {$(
        #[test]
        fn $test() {
            let cfg = $cfg;
            let (ours, map, ids) = ours_seeded(&ModelConfig::$family(cfg.clone()));
            let ccfg = candle_config(&cfg, serde_json::json!($overrides));
            let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
            let mut theirs = <$theirs>::new(&ccfg, vb).unwrap();
            let name = ModelConfig::$family(cfg).family().name();
            assert_parity(name, &ours, &ids, stepper!(theirs));
        }
    )*};
}

llama_like_parity! {
    qwen2_no_prefix_parity_with_candle_transformers:
        Qwen2(qwen2::Config::tiny()) vs ct_qwen2::ModelForCausalLM,
        {"sliding_window": 4096, "use_sliding_window": false, "hidden_act": "silu"};
    mistral_no_prefix_parity_with_candle_transformers:
        Mistral(mistral::Config { sliding_window: None, ..mistral::Config::tiny() })
        vs ct_mistral::Model,
        {"sliding_window": null, "use_flash_attn": false, "hidden_act": "silu"};
    qwen3_no_prefix_parity_with_candle_transformers:
        Qwen3(qwen3::Config::tiny()) vs ct_qwen3::ModelForCausalLM,
        {"sliding_window": null, "use_sliding_window": false, "hidden_act": "silu"};
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
) -> ct_gemma2::Model {
    let ccfg = candle_config(
        cfg,
        json!({"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window}),
    );
    let q_factor = (cfg.core.head_dim as f64 / cfg.attn.query_pre_attn_scalar as f64).sqrt();
    let map = replaced(map, "self_attn.q_proj.weight", |t| (t * q_factor).unwrap());
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    ct_gemma2::Model::new(false, &ccfg, vb).unwrap()
}

/// The tiny config as it is (head_dim 24 != 64 / 4, query_pre_attn_scalar 16, both
/// soft-caps, tied embeddings); its window of 8 is longer than the 7-token prompt.
#[test]
fn gemma2_no_prefix_parity_with_candle_transformers() {
    let cfg = gemma2::Config::tiny();
    let (ours, map, ids) = ours_seeded(&ModelConfig::Gemma2(cfg.clone()));
    assert!(ids.dim(1).unwrap() <= cfg.attn.sliding_window.unwrap());
    let mut theirs = candle_gemma2(&cfg, &map, None);
    assert_parity("gemma2", &ours, &ids, stepper!(theirs));
}

/// Every layer sliding with a window of 3 (keys in (p - 3, p]) over the 7-token
/// prompt, against candle-transformers' window of 2 (its `j + 2 < i` masks admit the
/// same 3 keys), whole-prompt pass; and the window does change the logits.
#[test]
fn gemma2_sliding_window_parity_with_candle_transformers() {
    let cfg = gemma2::Config {
        attn: gemma2::Attn {
            sliding_window: Some(3),
            layer_types: Some(vec!["sliding_attention".into(); 3]),
            ..gemma2::Config::tiny().attn
        },
        ..gemma2::Config::tiny()
    };
    let (ours, map, ids) = ours_seeded(&ModelConfig::Gemma2(cfg.clone()));
    let ours = last(&ours);
    let mut theirs = candle_gemma2(&cfg, &map, Some(2));
    assert_last_position_parity(
        "gemma2 all-sliding (W 3) parity vs candle-transformers gemma2 (W 2)",
        &ours,
        &theirs.forward(&ids, 0).unwrap(),
    );
    let full = gemma2::Config {
        attn: gemma2::Attn {
            sliding_window: None,
            ..cfg.attn.clone()
        },
        ..cfg
    };
    let (unwindowed, _, _) = ours_seeded(&ModelConfig::Gemma2(full));
    let moved = max_abs_diff(&ours, &last(&unwindowed));
    assert!(
        moved > 1e-2,
        "the window of 3 moved the logits by only {moved}"
    );
}

/// The last position `[B, 1, V]` of logits `[B, S, V]`.
fn last(logits: &Tensor) -> Tensor {
    let s = logits.dim(1).unwrap();
    logits.narrow(1, s - 1, 1).unwrap()
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
    assert!(cfg.core.sizes.tie_word_embeddings);
    assert_eq!(cfg.core.rope.theta(), 1e6);

    // Nothing but model_type: transformers' defaults (32 KV heads, not the heads).
    let ModelConfig::Qwen2(d) = parse_hf_config(r#"{"model_type": "qwen2"}"#) else {
        panic!("qwen2")
    };
    assert_eq!(
        (
            d.core.num_key_value_heads,
            d.sliding.sliding_window,
            d.sliding.max_window_layers
        ),
        (Some(32), Some(4096), 28)
    );
    assert_eq!(
        (
            d.core.sizes.vocab_size,
            d.core.sizes.hidden_size,
            d.core.sizes.num_hidden_layers
        ),
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
    assert_eq!((d.head_dim, d.core.num_key_value_heads), (128, Some(32)));
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
) -> ct_gemma3::Model {
    let ccfg = candle_config(
        cfg,
        json!({"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window,
            "sliding_window_pattern": pattern}),
    );
    let c = (cfg.core.head_dim as f64 / cfg.attn.query_pre_attn_scalar as f64).sqrt();
    // [D]: c (1 + w) - 1
    let map = replaced(map, "self_attn.q_norm.weight", |t| {
        (((t + 1.0).unwrap() * c).unwrap() - 1.0).unwrap()
    });
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    ct_gemma3::Model::new(false, &ccfg, vb).unwrap()
}

/// The tiny config without RoPE scaling (see above), with a window of `window`.
fn gemma3_unscaled(window: usize) -> gemma3::Config {
    gemma3::Config {
        rope_scaling: None,
        attn: gemma2::Attn {
            sliding_window: Some(window),
            ..gemma3::Config::tiny().attn
        },
        ..gemma3::Config::tiny()
    }
}

/// Tiny Gemma 3 (layers 0, 1, 3, 4 sliding with RoPE base 1e4, layer 2 global with
/// 1e6; one KV head; q/k norms) with a window of 8 that the 7-token prompt does not
/// reach, whole prompt and token by token.
#[test]
fn gemma3_no_prefix_parity_with_candle_transformers() {
    let cfg = gemma3_unscaled(8);
    let (ours, map, ids) = ours_seeded(&ModelConfig::Gemma3(cfg.clone()));
    assert!(ids.dim(1).unwrap() <= 8);
    let mut theirs = candle_gemma3(&cfg, &map, 8, 3);
    assert_parity("gemma3", &ours, &ids, stepper!(theirs));
}

/// The tiny layer pattern with a window of 3 (keys in (p - 3, p]) over the 7-token
/// prompt, against candle-transformers' window of 2 (the same 3 keys), whole-prompt
/// pass.
#[test]
fn gemma3_sliding_window_parity_with_candle_transformers() {
    let cfg = gemma3_unscaled(3);
    let (ours, map, ids) = ours_seeded(&ModelConfig::Gemma3(cfg.clone()));
    let mut theirs = candle_gemma3(&cfg, &map, 2, 3);
    assert_last_position_parity(
        "gemma3 sliding (W 3) parity vs candle-transformers gemma3 (W 2)",
        &last(&ours),
        &theirs.forward(&ids, 0).unwrap(),
    );
}
