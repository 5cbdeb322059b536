//! Llama family: numerical parity with candle-transformers (without and with a prefix),
//! the explicit `head_dim` cache geometry, config parsing, and gradients reaching the
//! prefix.

use crate::common::{build_with_weights, logits_with, max_abs_diff, parity_prompt};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as ct_llama, llama2_c};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::generate::{forward_logits, greedy, DecodeOptions};
use prefix_harness::engine::model::{llama, weights, Family, Model, ModelConfig, Ops};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};

const SEED: u64 = 7;
const TOL: f32 = 1e-4;

/// The tiny config with `head_dim` = hidden / heads (16): candle-transformers' `llama`
/// and `llama2_c` both derive the head size as `hidden_size / num_attention_heads` and
/// cannot express the tiny config's explicit `head_dim` 24. GQA (4 heads over 2 KV
/// heads) is kept: both references support it.
fn reference_config() -> llama::Config {
    llama::Config {
        head_dim: None,
        ..llama::Config::tiny()
    }
}

/// Our model and the exact weights it was built from.
fn build(cfg: &llama::Config, dev: &Device) -> (Box<dyn Model>, HashMap<String, Tensor>) {
    build_with_weights(&ModelConfig::Llama(cfg.clone()), SEED, dev)
}

fn ct_config(cfg: &llama::Config) -> ct_llama::Config {
    ct_llama::Config {
        hidden_size: cfg.core.sizes.hidden_size,
        intermediate_size: cfg.core.sizes.intermediate_size,
        vocab_size: cfg.core.sizes.vocab_size,
        num_hidden_layers: cfg.core.sizes.num_hidden_layers,
        num_attention_heads: cfg.core.sizes.num_attention_heads,
        num_key_value_heads: cfg.num_kv_heads(),
        use_flash_attn: false,
        rms_norm_eps: cfg.core.rms_norm_eps,
        rope_theta: cfg.core.rope.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: cfg.core.sizes.max_position_embeddings,
        tie_word_embeddings: cfg.core.sizes.tie_word_embeddings,
    }
}

#[test]
fn no_prefix_parity_with_candle_transformers_llama() {
    let dev = Device::Cpu;
    let cfg = reference_config();
    let (model, map) = build(&cfg, &dev);
    let ids = parity_prompt(&dev);
    let (_b, s) = ids.dims2().unwrap();
    let ours = logits_with(model.as_ref(), None, CacheMode::Dynamic, &ids);
    assert_eq!(ours.dims(), &[2, s, cfg.core.sizes.vocab_size]);

    let ccfg = ct_config(&cfg);
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let theirs_model = ct_llama::Llama::load(vb, &ccfg).unwrap();

    // Their forward returns the last position's logits `[B, V]` only. A prefill of the
    // whole prompt checks the last position (their causal mask included) ...
    let mut cache = ct_llama::Cache::new(true, DType::F32, &ccfg, &dev).unwrap();
    let theirs = theirs_model.forward(&ids, 0, &mut cache).unwrap();
    let last = ours.narrow(1, s - 1, 1).unwrap().squeeze(1).unwrap();
    let mut worst = max_abs_diff(&last, &theirs);
    // ... and feeding one token at a time through their KV cache checks every position.
    let mut cache = ct_llama::Cache::new(true, DType::F32, &ccfg, &dev).unwrap();
    for pos in 0..s {
        let tok = ids.narrow(1, pos, 1).unwrap();
        let theirs = theirs_model.forward(&tok, pos, &mut cache).unwrap();
        let ours_pos = ours.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
        worst = worst.max(max_abs_diff(&ours_pos, &theirs));
    }
    println!("llama no-prefix parity vs candle-transformers llama: max abs diff {worst:e}");
    assert!(worst <= TOL, "max abs diff {worst} > {TOL}");
}

/// Meta's interleaved RoPE order from Hugging Face's `rotate_half` order along the
/// last (head_dim) axis of `x: [..., H * D]` viewed per head: HF index `c * D/2 + i`
/// becomes Meta index `2i + c` (the inverse of the `permute` in transformers'
/// `convert_llama_weights_to_hf.py`).
fn hf_to_interleaved_rows(w: &Tensor, heads: usize, d: usize) -> Tensor {
    // w: [H*D, E]
    let e = w.dim(1).unwrap();
    w.reshape((heads, 2, d / 2, e))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((heads * d, e))
        .unwrap()
        .contiguous()
        .unwrap()
}

/// The same change of basis on the last axis of prefix keys `[B, KVH, P, D]`.
fn hf_to_interleaved_last(k: &Tensor) -> Tensor {
    let (b, h, p, d) = k.dims4().unwrap();
    k.reshape((b, h, p, 2, d / 2))
        .unwrap()
        .transpose(3, 4)
        .unwrap()
        .reshape((b, h, p, d))
        .unwrap()
}

#[test]
fn prefix_parity_with_llama2_c() {
    let dev = Device::Cpu;
    let cfg = reference_config();
    let (heads, kvh, d) = (
        cfg.core.sizes.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
    );
    let (model, mut map) = build(&cfg, &dev);
    let p = 5;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(p), &model.geometry(), &dev).unwrap();
    let ids = parity_prompt(&dev);
    let (b, s) = ids.dims2().unwrap();
    let ours = logits_with(model.as_ref(), Some(&prefix), CacheMode::Dynamic, &ids);

    // llama2_c uses Hugging Face's parameter names but Meta's interleaved RoPE (pairs
    // (2i, 2i+1)), while our model (like transformers) rotates (i, i + D/2). Permuting
    // the rows of q_proj and k_proj per head, as transformers' conversion script does
    // in the other direction, makes both compute the same attention scores: q.k is
    // invariant when q and k are permuted alike. The prefix keys enter the scores
    // too, so they get the same permutation of head_dim; values are untouched.
    for l in 0..cfg.core.sizes.num_hidden_layers {
        for (name, h) in [("q_proj", heads), ("k_proj", kvh)] {
            let key = format!("model.layers.{l}.self_attn.{name}.weight");
            let w = map.get(&key).unwrap().clone();
            map.insert(key, hf_to_interleaved_rows(&w, h, d));
        }
    }
    let c2 = llama2_c::Config {
        dim: cfg.core.sizes.hidden_size,
        hidden_dim: cfg.core.sizes.intermediate_size,
        n_layers: cfg.core.sizes.num_hidden_layers,
        n_heads: heads,
        n_kv_heads: kvh,
        vocab_size: cfg.core.sizes.vocab_size,
        // Its RoPE table length; its theta is fixed at 10000 (= our rope_theta here).
        seq_len: cfg.core.sizes.max_position_embeddings,
        norm_eps: cfg.core.rms_norm_eps,
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let mut cache = llama2_c::Cache::new(true, &c2, vb.clone()).unwrap();
    let theirs_model = llama2_c::Llama::load(vb, c2).unwrap();

    // Inject our prefix: its cache holds `[B, P, KVH, D]` (sequence before heads).
    let pkv = prefix.past_key_values(b).unwrap();
    for (l, lp) in pkv.iter().enumerate() {
        assert_eq!(lp.key.dims(), &[b, kvh, p, d]);
        let k = hf_to_interleaved_last(&lp.key)
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let v = lp.value.transpose(1, 2).unwrap().contiguous().unwrap();
        cache.kvs[l] = Some((k, v));
    }
    // Real tokens start at position P. It returns logits for every position `[B, S, V]`.
    let theirs = theirs_model.forward(&ids, p, &mut cache).unwrap();
    let prefill = max_abs_diff(&ours, &theirs);
    println!("llama prefix parity vs llama2_c (prefill, P={p}, S={s}): max abs diff {prefill:e}");
    assert!(prefill <= TOL, "prefill max abs diff {prefill} > {TOL}");

    // Decoding continues at positions P+S, P+S+1, ...: compare greedy steps too.
    let steps = 3;
    let out = greedy(
        model.as_ref(),
        Some(&prefix),
        &DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), steps),
        &ids,
        None,
    )
    .unwrap();
    let mut last = theirs.narrow(1, s - 1, 1).unwrap().squeeze(1).unwrap(); // [B, V]
    let mut decode: f32 = 0.0;
    for (step, ours_step) in out.logits.iter().enumerate() {
        decode = decode.max(max_abs_diff(ours_step, &last));
        let next = last.argmax(D::Minus1).unwrap(); // [B]
        let toks: Vec<u32> = next.to_vec1().unwrap();
        let ours_toks: Vec<u32> = out.tokens.iter().map(|t| t[step]).collect();
        assert_eq!(toks, ours_toks, "greedy tokens differ at step {step}");
        let tok = next.unsqueeze(1).unwrap(); // [B, 1]
        last = theirs_model
            .forward(&tok, p + s + step, &mut cache)
            .unwrap()
            .squeeze(1)
            .unwrap();
    }
    println!(
        "llama prefix parity vs llama2_c (greedy decode, {steps} steps): max abs diff {decode:e}"
    );
    assert!(decode <= TOL, "decode max abs diff {decode} > {TOL}");
}

#[test]
fn explicit_head_dim_shapes_the_cache() {
    let dev = Device::Cpu;
    let cfg = llama::Config::tiny();
    assert_eq!(cfg.head_dim, Some(24));
    assert_ne!(
        cfg.core.sizes.hidden_size / cfg.core.sizes.num_attention_heads,
        24
    );
    let (model, map) = build(&cfg, &dev);
    // The projections are sized by head_dim, not hidden / heads.
    assert_eq!(
        map["model.layers.0.self_attn.q_proj.weight"].dims(),
        &[4 * 24, 64]
    );
    assert_eq!(
        map["model.layers.0.self_attn.k_proj.weight"].dims(),
        &[2 * 24, 64]
    );
    assert_eq!(
        map["model.layers.0.self_attn.o_proj.weight"].dims(),
        &[64, 4 * 24]
    );
    let p = 6;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(p), &model.geometry(), &dev).unwrap();
    let ids = parity_prompt(&dev);
    let (b, s) = ids.dims2().unwrap();
    let out = greedy(
        model.as_ref(),
        Some(&prefix),
        &DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 1),
        &ids,
        None,
    )
    .unwrap();
    for layer in 0..cfg.core.sizes.num_hidden_layers {
        assert_eq!(
            out.cache.stored_key_shape(layer),
            Some(vec![b, 2, p + s, 24]),
            "layer {layer}"
        );
    }
    let l: Vec<Vec<f32>> = out.logits[0].to_vec2().unwrap();
    assert!(l.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn parameter_names_follow_llama_for_causal_lm() {
    let dev = Device::Cpu;
    let mut cfg = llama::Config::tiny();
    let names = |cfg: &llama::Config| {
        let mut v: Vec<String> = weights::materialize(&ModelConfig::Llama(cfg.clone()), SEED, &dev)
            .unwrap()
            .into_keys()
            .collect();
        v.sort();
        v
    };
    let mut expected = vec![
        "lm_head.weight".to_string(),
        "model.embed_tokens.weight".into(),
        "model.norm.weight".into(),
    ];
    for l in 0..2 {
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
        ] {
            expected.push(format!("model.layers.{l}.{n}"));
        }
    }
    expected.sort();
    assert_eq!(names(&cfg), expected);

    cfg.core.sizes.tie_word_embeddings = true;
    cfg.attention_bias = true;
    let got = names(&cfg);
    assert!(!got.contains(&"lm_head.weight".to_string()));
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert!(
            got.contains(&format!("model.layers.1.self_attn.{proj}.bias")),
            "{proj}"
        );
    }
}

const LLAMA_CONFIG_JSON: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 2048,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 22,
  "num_key_value_heads": 4,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "transformers_version": "4.46.3",
  "use_cache": true,
  "vocab_size": 32000
}"#;

#[test]
fn from_hf_json_parses_a_llama_config() {
    let mc = ModelConfig::from_hf_json(LLAMA_CONFIG_JSON).unwrap();
    let ModelConfig::Llama(cfg) = &mc else {
        panic!("expected a llama config, got {mc:?}");
    };
    assert_eq!(cfg.core.sizes.num_hidden_layers, 22);
    assert_eq!(cfg.core.num_key_value_heads, Some(4));
    assert_eq!(cfg.head_dim, Some(128));
    assert_eq!(cfg.core.rms_norm_eps, 1e-5);
    assert_eq!(cfg.sliding_window, None);
    assert!(!cfg.core.sizes.tie_word_embeddings);
    let g = mc.geometry();
    assert_eq!(
        (
            g.num_layers,
            g.num_attention_heads,
            g.num_kv_heads,
            g.head_dim
        ),
        (22, 32, 4, 128)
    );
    assert_eq!(
        (g.hidden_size, g.vocab_size, g.encoder_decoder),
        (2048, 32000, false)
    );

    // Minimal config: defaults fill in (KV heads = heads, head_dim = hidden / heads).
    let minimal = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8}"#;
    let ModelConfig::Llama(cfg) = ModelConfig::from_hf_json(minimal).unwrap() else {
        panic!("expected llama");
    };
    assert_eq!((cfg.num_kv_heads(), cfg.head_dim()), (8, 8));
    assert_eq!(
        (
            cfg.core.rms_norm_eps,
            cfg.core.rope.rope_theta,
            cfg.core.sizes.max_position_embeddings
        ),
        (1e-6, 10000.0, 2048)
    );
    assert!(!cfg.core.sizes.tie_word_embeddings && !cfg.attention_bias);

    // transformers >= 5 moves rope_theta into rope_parameters; Llama 3.1 scaling.
    let v5 = r#"{"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 1, "sliding_window": 16, "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}}"#;
    let mc = ModelConfig::from_hf_json(v5).unwrap();
    let ModelConfig::Llama(cfg) = &mc else {
        panic!("expected llama")
    };
    assert_eq!(cfg.core.rope.theta(), 500000.0);
    assert_eq!(cfg.sliding_window, Some(16));
    assert!(mc
        .build(weights::seeded(1, DType::F32, &Device::Cpu))
        .is_ok());

    // An unsupported RoPE type is refused when building, not silently ignored.
    let yarn = LLAMA_CONFIG_JSON.replace(
        r#""rope_scaling": null"#,
        r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#,
    );
    let mc = ModelConfig::from_hf_json(&yarn).unwrap();
    let mut small = match mc {
        ModelConfig::Llama(c) => c,
        _ => unreachable!(),
    };
    (
        small.core.sizes.hidden_size,
        small.core.sizes.intermediate_size,
        small.core.sizes.num_hidden_layers,
        small.core.sizes.vocab_size,
    ) = (64, 64, 1, 16);
    small.head_dim = Some(16);
    let err = ModelConfig::Llama(small)
        .build(weights::seeded(1, DType::F32, &Device::Cpu))
        .err()
        .expect("yarn must be refused");
    assert!(err.to_string().contains("yarn"), "{err}");
}

#[test]
fn config_sliding_window_limits_attention_like_a_cache_window() {
    let dev = Device::Cpu;
    let window = 3;
    let ids = parity_prompt(&dev);
    let plain = llama::Config::tiny();
    let windowed = llama::Config {
        sliding_window: Some(window),
        ..llama::Config::tiny()
    };
    let (m_plain, _) = build(&plain, &dev);
    let (m_win, _) = build(&windowed, &dev);
    let dynamic = CacheConfig::new(CacheMode::Dynamic);
    let mut with_window = dynamic.clone();
    with_window.window = Some(window);
    let (a, _) = forward_logits(m_win.as_ref(), None, &dynamic, Ops::Kernels, &ids, None).unwrap();
    let (b, _) = forward_logits(
        m_plain.as_ref(),
        None,
        &with_window,
        Ops::Kernels,
        &ids,
        None,
    )
    .unwrap();
    let (c, _) =
        forward_logits(m_plain.as_ref(), None, &dynamic, Ops::Kernels, &ids, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // The first `window` positions see everything either way; later ones differ.
    let early = max_abs_diff(
        &a.narrow(1, 0, window).unwrap(),
        &c.narrow(1, 0, window).unwrap(),
    );
    assert_eq!(early, 0.0);
    assert!(max_abs_diff(&a, &c) > 1e-3);
}

#[test]
fn every_prefix_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let (model, _) = build(&llama::Config::tiny(), &dev);
    let mut pc = PrefixConfig::new(4);
    pc.projection = true;
    let prefix = PrefixEncoder::new(&pc, &model.geometry(), &dev).unwrap();
    let ids = parity_prompt(&dev);
    let logits = logits_with(model.as_ref(), Some(&prefix), CacheMode::None, &ids);
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in prefix.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm {n}");
    }
}

/// The attention and MLP sub-blocks as single graph nodes with their own backward pass
/// (`kernels::AttentionBlock`, `kernels::SwiGluMlp`) give the layers composed from the
/// single ops the same logits and the same gradient for every prefix parameter, with
/// and without the projection MLP, through each cache layout training can meet (the
/// block finds the new keys at the end of what the cache returns), in every family of
/// the Llama decoder (`llama::Block`: Qwen2's q/k/v biases, Qwen3's per-head q/k norms,
/// Phi-3's split projections). The tiny configs have two layers, so layer 0's prefix
/// gradient flows through layer 1's block backward pass into its input, GQA (4 heads
/// over 2 KV heads) included.
#[test]
fn block_ops_match_the_composed_layers_in_logits_and_prefix_gradients() {
    let dev = Device::Cpu;
    let ids = parity_prompt(&dev);
    let families = [
        Family::Llama,
        Family::Qwen2,
        Family::Mistral,
        Family::Qwen3,
        Family::Phi3,
    ];
    for family in families {
        let mc = ModelConfig::tiny(family);
        let (model, _) = build_with_weights(&mc, SEED, &dev);
        block_ops_match_composed(model.as_ref(), &ids, family.name());
    }
}

/// [`block_ops_match_the_composed_layers_in_logits_and_prefix_gradients`] for `model`
/// (`name` in the messages) on `ids: [B, S]`.
fn block_ops_match_composed(model: &dyn Model, ids: &Tensor, name: &str) {
    let dev = Device::Cpu;
    let modes = [
        CacheMode::None,
        CacheMode::Legacy,
        CacheMode::Sliding { window: 5 },
    ];
    for projection in [false, true] {
        let mut pc = PrefixConfig::new(4);
        pc.projection = projection;
        let prefix = PrefixEncoder::new(&pc, &model.geometry(), &dev).unwrap();
        for mode in modes {
            let run = |ops| {
                let cache = CacheConfig::new(mode);
                let (logits, _) =
                    forward_logits(model, Some(&prefix), &cache, ops, ids, None).unwrap();
                // A fixed, non-uniform weighting of the logits: d loss / d logits = r.
                let n = logits.elem_count();
                let r = Tensor::arange(0f32, n as f32, &dev)
                    .and_then(|t| (t * 0.37)?.sin())
                    .and_then(|t| t.reshape(logits.dims()))
                    .unwrap();
                let grads = (&logits * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g: Vec<(String, Tensor)> = prefix
                    .vars()
                    .into_iter()
                    .map(|(name, var)| {
                        let g = grads
                            .get(var.as_tensor())
                            .unwrap_or_else(|| panic!("{} {name}: no gradient", mode.name()))
                            .clone();
                        (name, g)
                    })
                    .collect();
                (logits.detach(), g)
            };
            let (composed, composed_grads) = run(Ops::Composed);
            let (blocks, block_grads) = run(Ops::Kernels);
            let case = format!("{name} {} projection={projection}", mode.name());
            let d = max_abs_diff(&blocks, &composed);
            assert!(d <= TOL, "{case}: logits differ by {d}");
            for ((name, a), (_, b)) in block_grads.iter().zip(&composed_grads) {
                let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let scale = scale.to_scalar::<f32>().unwrap();
                assert!(
                    scale > 1e-3,
                    "{case}: the composed gradient of {name} is ~0"
                );
                let d = max_abs_diff(a, b);
                assert!(
                    d <= TOL * scale,
                    "{case}: d {name} differs by {d} (scale {scale})"
                );
            }
        }
    }
}
