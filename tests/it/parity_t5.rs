//! T5: parity with candle-transformers on the same weights, prefix geometry of the
//! self and cross caches, cache modes against recomputation, the historical
//! "cross cache marked updated" bug, and `config.json` parsing.

use crate::common::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5 as ct5;
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::diagnosis::{Attention, DiagnosisClass, EngineError, TensorKind};
use prefix_harness::engine::generate::{forward_logits, greedy, DecodeOptions};
use prefix_harness::engine::model::t5::{relative_position_bucket, Config};
use prefix_harness::engine::model::{weights, Model, ModelConfig, Ops};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::engine::trace::CacheOp;

const SEED: u64 = 7;

/// The tiny config as a Hugging Face `config.json`, with the fields candle's
/// `t5::Config` requires (and ours ignores).
const TINY_JSON: &str = r#"{
  "model_type": "t5",
  "architectures": ["T5ForConditionalGeneration"],
  "vocab_size": 256, "d_model": 64, "d_kv": 24, "d_ff": 128,
  "num_layers": 2, "num_heads": 4,
  "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
  "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
  "feed_forward_proj": "relu", "tie_word_embeddings": true,
  "is_encoder_decoder": true, "use_cache": true,
  "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0
}"#;

/// Gated-GELU, untied LM head, more decoder than encoder layers, another odd d_kv.
const GATED_JSON: &str = r#"{
  "model_type": "t5",
  "vocab_size": 256, "d_model": 64, "d_kv": 20, "d_ff": 96,
  "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4,
  "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
  "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0,
  "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
  "is_encoder_decoder": true,
  "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0
}"#;

fn t5_config(json: &str) -> Config {
    match ModelConfig::from_hf_json(json).unwrap() {
        ModelConfig::T5(c) => c,
        other => panic!("expected a T5 config, got {other:?}"),
    }
}

fn build(cfg: &Config, dev: &Device) -> Box<dyn Model> {
    ModelConfig::T5(cfg.clone())
        .build(weights::seeded(SEED, DType::F32, dev))
        .unwrap()
}

#[test]
fn no_prefix_parity_with_candle_transformers() {
    let dev = Device::Cpu;
    for (name, json) in [
        ("tiny relu tied", TINY_JSON),
        ("gated-gelu untied", GATED_JSON),
    ] {
        let cfg = t5_config(json);
        let mc = ModelConfig::T5(cfg.clone());
        let map = weights::materialize(&mc, SEED, &dev).unwrap();
        let ours = mc
            .build(VarBuilder::from_tensors(map.clone(), DType::F32, &dev))
            .unwrap();
        let theirs_cfg: ct5::Config = serde_json::from_str(json).unwrap();
        let mut theirs = ct5::T5ForConditionalGeneration::load(
            VarBuilder::from_tensors(map, DType::F32, &dev),
            &theirs_cfg,
        )
        .unwrap();

        // [B, E] and [B, T]. candle's decoder uses the bidirectional bucket formula
        // also in the decoder; it agrees with transformers' unidirectional buckets for
        // distances below 8, so T stays <= 8.
        let ids = Tensor::new(
            &[[5u32, 17, 200, 3, 42, 9, 1], [8, 8, 120, 77, 250, 2, 1]],
            &dev,
        )
        .unwrap();
        let dec = Tensor::new(&[[0u32, 12, 99, 7, 3, 150], [0, 44, 5, 5, 201, 60]], &dev).unwrap();
        let (b, e_len) = ids.dims2().unwrap();
        let t = dec.dim(1).unwrap();

        // Encoder output [B, E, d_model].
        let ours_enc = ours
            .encode(
                &ids,
                &Tensor::ones((b, e_len), DType::F32, &dev).unwrap(),
                Ops::Kernels,
            )
            .unwrap();
        let theirs_enc = theirs.encode(&ids).unwrap();
        let enc_diff = max_abs_diff(&ours_enc.states, &theirs_enc);

        // Decoder logits [B, T, V]; candle returns the last position only, so decode
        // every prefix of the decoder ids from a cleared cache.
        let (logits, _) = forward_logits(
            ours.as_ref(),
            None,
            &CacheConfig::new(CacheMode::Dynamic),
            Ops::Kernels,
            &ids,
            Some(&dec),
        )
        .unwrap();
        // candle multiplies the tied head's input by sqrt(d_model) where transformers
        // multiplies by d_model^-0.5 (argmax is unaffected): divide by d_model, exact
        // for a power of two.
        let rescale = if cfg.tie_word_embeddings {
            cfg.d_model as f64
        } else {
            1.0
        };
        let mut logit_diff = 0f32;
        for pos in 0..t {
            theirs.clear_kv_cache();
            // [B, V]
            let theirs_last = (theirs
                .decode(&dec.narrow(1, 0, pos + 1).unwrap(), &theirs_enc)
                .unwrap()
                / rescale)
                .unwrap();
            let ours_pos = logits.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
            logit_diff = logit_diff.max(max_abs_diff(&ours_pos, &theirs_last));
        }
        let scale = logits
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!(
            "t5 parity ({name}): encoder max abs diff {enc_diff:e}, decoder logits max abs diff {logit_diff:e} (max |logit| {scale})"
        );
        assert!(enc_diff <= 1e-4, "{name}: encoder diff {enc_diff}");
        assert!(logit_diff <= 1e-4, "{name}: logits diff {logit_diff}");
    }
}

#[test]
fn relative_position_buckets_match_transformers() {
    // (key - query, bidirectional bucket, unidirectional bucket) from transformers'
    // `_relative_position_bucket` with 32 buckets and max distance 128.
    let cases: [(i64, usize, usize); 13] = [
        (0, 0, 0),
        (3, 19, 0),
        (-3, 3, 3),
        (7, 23, 0),
        (-8, 8, 8),
        (-10, 8, 10),
        (-15, 9, 15),
        (-20, 10, 17),
        (-40, 12, 23),
        (-100, 15, 30),
        (-200, 15, 31),
        (20, 26, 0),
        (200, 31, 0),
    ];
    for (rel, bi, uni) in cases {
        assert_eq!(
            relative_position_bucket(rel, true, 32, 128),
            bi,
            "bidirectional {rel}"
        );
        assert_eq!(
            relative_position_bucket(rel, false, 32, 128),
            uni,
            "unidirectional {rel}"
        );
    }
}

#[test]
fn encoder_padding_is_invisible() {
    // A padded row gives the same encoder states and decoder logits as the unpadded
    // shorter sequence: the encoder mask and the cross mask both hide padding.
    let dev = Device::Cpu;
    let model = build(&Config::tiny(), &dev);
    let short = Tensor::new(&[[5u32, 17, 200, 3]], &dev).unwrap();
    let padded = Tensor::new(&[[5u32, 17, 200, 3, 0, 0]], &dev).unwrap();
    let pad = Tensor::new(&[[1f32, 1., 1., 1., 0., 0.]], &dev).unwrap();
    let a = model
        .encode(
            &short,
            &Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
            Ops::Kernels,
        )
        .unwrap();
    let b = model.encode(&padded, &pad, Ops::Kernels).unwrap();
    let enc_diff = max_abs_diff(&a.states, &b.states.narrow(1, 0, 4).unwrap());
    let opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 4);
    let ga = greedy(model.as_ref(), None, &opts, &short, None).unwrap();
    let gb = greedy(model.as_ref(), None, &opts, &padded, Some(&pad)).unwrap();
    let mut logit_diff = 0f32;
    for (x, y) in ga.logits.iter().zip(gb.logits.iter()) {
        logit_diff = logit_diff.max(max_abs_diff(x, y));
    }
    println!("padding: encoder diff {enc_diff:e}, logits diff {logit_diff:e}");
    assert!(enc_diff <= 1e-5 && logit_diff <= 1e-4);
    assert_eq!(ga.tokens, gb.tokens);
}

#[test]
fn prefix_cache_modes_agree_and_shapes_hold() {
    let dev = Device::Cpu;
    let cfg = Config::tiny();
    let model = build(&cfg, &dev);
    let g = model.geometry();
    let p = 5;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(p), &g, &dev).unwrap();
    // [B, E] with padding at the end of row 1.
    let ids = Tensor::new(&[[5u32, 17, 200, 3, 42, 9], [8, 120, 77, 250, 0, 0]], &dev).unwrap();
    let pad = Tensor::new(
        &[[1f32, 1., 1., 1., 1., 1.], [1., 1., 1., 1., 0., 0.]],
        &dev,
    )
    .unwrap();
    let (b, e_len) = ids.dims2().unwrap();
    let (h, d) = (cfg.num_heads, cfg.d_kv);
    let steps = 5;

    let run = |mode: CacheMode| {
        greedy(
            model.as_ref(),
            Some(&prefix),
            &DecodeOptions::new(CacheConfig::new(mode), steps),
            &ids,
            Some(&pad),
        )
        .unwrap()
    };
    let reference = run(CacheMode::None);
    for mode in [
        CacheMode::None,
        CacheMode::Dynamic,
        CacheMode::Static { max_len: 64 },
        CacheMode::Legacy,
    ] {
        let out = if mode == CacheMode::None {
            reference.clone()
        } else {
            run(mode)
        };
        // Shapes read by the attention, per step t (t + 1 decoder tokens so far);
        // without a cache every pass recomputes all decoder tokens.
        let queries = |step: usize| if mode == CacheMode::None { step + 1 } else { 1 };
        let (mut n_self, mut n_cross) = (0, 0);
        for ev in &out.cache.trace.events {
            let Some(read) = &ev.key_read else { continue };
            match ev.attention {
                Attention::SelfAttn => {
                    assert_eq!(
                        read,
                        &vec![b, h, p + ev.step + 1, d],
                        "{mode:?} self {ev:?}"
                    );
                    assert_eq!(
                        ev.mask,
                        Some(vec![b, 1, queries(ev.step), p + ev.step + 1]),
                        "{mode:?}"
                    );
                    n_self += 1;
                }
                Attention::Cross => {
                    assert_eq!(read, &vec![b, h, p + e_len, d], "{mode:?} cross {ev:?}");
                    assert_eq!(
                        ev.mask,
                        Some(vec![b, 1, queries(ev.step), p + e_len]),
                        "{mode:?}"
                    );
                    // Computed once, then read back (EncoderDecoderCache.is_updated);
                    // recomputed every pass without a cache.
                    let expect_op = if ev.step == 0 || mode == CacheMode::None {
                        CacheOp::Update
                    } else {
                        CacheOp::Read
                    };
                    assert_eq!(ev.op, expect_op, "{mode:?} cross op {ev:?}");
                    n_cross += 1;
                }
            }
        }
        assert_eq!(n_self, steps * g.num_layers, "{mode:?}");
        assert_eq!(n_cross, steps * g.num_layers, "{mode:?}");

        let mut diff = 0f32;
        for (x, y) in reference.logits.iter().zip(out.logits.iter()) {
            diff = diff.max(max_abs_diff(x, y));
        }
        println!(
            "prefix P={p}, {}: tokens {:?}, max abs logit diff vs none {diff:e}",
            mode.name(),
            out.tokens
        );
        assert_eq!(out.tokens, reference.tokens, "{mode:?}");
        assert!(diff <= 1e-4, "{mode:?}: {diff}");
    }
}

#[test]
fn cross_prefix_marked_updated_is_diagnosed() {
    let dev = Device::Cpu;
    let cfg = Config::tiny();
    let model = build(&cfg, &dev);
    let p = 5;
    let prefix = PrefixEncoder::new(&PrefixConfig::new(p), &model.geometry(), &dev).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 200, 3, 42, 9], [8, 120, 77, 250, 11, 2]], &dev).unwrap();
    let mut cache = CacheConfig::new(CacheMode::Dynamic);
    cache.cross_prefix_marks_updated = true;
    let err = greedy(
        model.as_ref(),
        Some(&prefix),
        &DecodeOptions::new(cache, 3),
        &ids,
        None,
    )
    .unwrap_err();
    println!("{err}");
    let EngineError::Shape(d) = &err else {
        panic!("expected a shape diagnosis, got {err}")
    };
    assert_eq!(d.class, DiagnosisClass::SeqLen);
    assert_eq!(d.layer, Some(0));
    assert_eq!(d.attention, Some(Attention::Cross));
    assert_eq!(d.tensor, Some(TensorKind::Key));
    assert_eq!(d.expected_shape, vec![2, cfg.num_heads, p + 6, cfg.d_kv]);
    assert_eq!(d.actual_shape, vec![2, cfg.num_heads, p, cfg.d_kv]);
    assert!(d.hint.contains("PR 34312"), "{}", d.hint);
}

#[test]
fn parses_hf_config_json() {
    // t5-small's config.json (abridged task_specific_params).
    let t5_small = r#"{
      "architectures": ["T5WithLMHeadModel"],
      "d_ff": 2048, "d_kv": 64, "d_model": 512, "decoder_start_token_id": 0,
      "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
      "is_encoder_decoder": true, "layer_norm_epsilon": 1e-06, "model_type": "t5",
      "n_positions": 512, "num_heads": 8, "num_layers": 6, "output_past": true,
      "pad_token_id": 0, "relative_attention_num_buckets": 32,
      "task_specific_params": {"summarization": {"early_stopping": true, "length_penalty": 2.0,
        "max_length": 200, "min_length": 30, "no_repeat_ngram_size": 3, "num_beams": 4,
        "prefix": "summarize: "}},
      "vocab_size": 32128
    }"#;
    let c = t5_config(t5_small);
    assert_eq!(
        (c.d_model, c.d_kv, c.num_heads, c.num_layers, c.d_ff),
        (512, 64, 8, 6, 2048)
    );
    assert_eq!(c.decoder_layers(), 6);
    assert_eq!(c.relative_attention_max_distance, 128);
    assert_eq!(c.feed_forward_proj, "relu");
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.decoder_start_token_id, c.pad_token_id, c.eos_token_id),
        (0, 0, 1)
    );
    let g = c.geometry();
    assert!(g.encoder_decoder);
    assert_eq!(
        (
            g.num_layers,
            g.num_attention_heads,
            g.num_kv_heads,
            g.head_dim,
            g.hidden_size
        ),
        (6, 8, 8, 64, 512)
    );

    // t5-3b: d_kv 128 while d_model / num_heads = 32; flan-style gated, untied head.
    let t5_3b = r#"{
      "model_type": "t5", "d_ff": 16384, "d_kv": 128, "d_model": 1024,
      "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24, "vocab_size": 32128,
      "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
      "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
      "eos_token_id": 1, "pad_token_id": 0, "decoder_start_token_id": 0,
      "torch_dtype": "float32", "transformers_version": "4.46.0", "use_cache": true
    }"#;
    let c = t5_config(t5_3b);
    assert_eq!(c.d_kv, 128);
    assert_eq!(c.geometry().head_dim, 128);
    assert_ne!(c.geometry().head_dim, c.d_model / c.num_heads);
    assert!(!c.tie_word_embeddings);
    assert!(c.feed_forward().unwrap().0);

    let bad = t5_small.replace(
        "\"n_positions\"",
        "\"feed_forward_proj\": \"gated-tanh-x\", \"n_positions\"",
    );
    let c = t5_config(&bad);
    assert!(c.feed_forward().is_err());
}
