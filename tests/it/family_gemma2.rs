//! Gemma 2: `config.json` with transformers' defaults and `layer_types`, parameter
//! names, and that each Gemma-specific piece (both soft-caps, `query_pre_attn_scalar`,
//! the sliding layers) reaches the logits of the tiny config. The logits themselves are
//! checked against candle-transformers (`tests/it/parity_families.rs`) and transformers +
//! PEFT (`scenarios/stack/gemma2.yaml`).

use crate::common::{
    assert_each_change_moves_logits, assert_tied_without_biases, family_parameters, family_parser,
    long_prompt,
};
use prefix_harness::engine::model::{gemma2, gemma3, ModelConfig};
use rstest::rstest;

family_parser!(Gemma2, gemma2::Config);

#[test]
fn gemma2_config_json_defaults_and_layer_types() {
    // Nothing but model_type: transformers 5's defaults (Gemma-2-2B's geometry).
    let d = parse(r#"{"model_type": "gemma2", "num_hidden_layers": 4}"#);
    assert_eq!(
        (
            d.core.sizes.hidden_size,
            d.core.sizes.num_attention_heads,
            d.core.num_key_value_heads,
            d.core.head_dim
        ),
        (2304, 8, 4, 256)
    );
    assert_eq!(d.attn.query_pre_attn_scalar, 256);
    assert_eq!(
        (
            d.caps.attn_logit_softcapping,
            d.caps.final_logit_softcapping
        ),
        (Some(50.0), Some(30.0))
    );
    assert!(d.core.sizes.tie_word_embeddings);
    // Without layer_types the even layers slide (transformers 4.46's `layer_idx % 2`
    // and transformers 5's default layer_types agree).
    assert_eq!(d.windows().unwrap(), [Some(4096), None, Some(4096), None]);
    // A gemma-2-9b-style config.json: head_dim 256 != 3584 / 16, explicit layer_types,
    // both spellings of the activation, null soft-caps.
    let c = parse(
        r#"{"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "num_hidden_layers": 3, "intermediate_size": 14336,
        "vocab_size": 256000, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        "final_logit_softcapping": null, "attn_logit_softcapping": null,
        "torch_dtype": "bfloat16"}"#,
    );
    assert_eq!(c.windows().unwrap(), [None, Some(4096), Some(4096)]);
    assert_eq!(
        (
            c.caps.attn_logit_softcapping,
            c.caps.final_logit_softcapping
        ),
        (None, None)
    );
    let mc = ModelConfig::Gemma2(c);
    assert_eq!(
        (mc.geometry().num_kv_heads, mc.geometry().head_dim),
        (8, 256)
    );
    // Refused: wrong layer_types length or kind, odd head_dim, another activation.
    for bad in [
        r#"{"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["full_attention"]}"#,
        r#"{"model_type": "gemma2", "num_hidden_layers": 1, "layer_types": ["chunked_attention"]}"#,
        r#"{"model_type": "gemma2", "num_hidden_layers": 1, "head_dim": 25}"#,
        r#"{"model_type": "gemma2", "num_hidden_layers": 1, "hidden_activation": "relu"}"#,
        r#"{"model_type": "gemma2", "num_hidden_layers": 1, "attn_logit_softcapping": 0}"#,
    ] {
        let e = ModelConfig::from_hf_json(bad).unwrap_err().to_string();
        assert!(e.contains("gemma2"), "{bad}: {e}");
    }
}

/// Gemma 2 and Gemma 3 (whose decoder is Gemma 2's) read transformers' parameter names:
/// the embedding, the final norm, the four norms of `layer`, layer 0's attention output
/// and MLP gate, and each family's `own` names and `dims`; tied embeddings, no bias.
#[rstest]
#[case::gemma2(
    ModelConfig::Gemma2(gemma2::Config::tiny()),
    2,
    &["model.layers.0.self_attn.q_proj.weight"],
    &[
        ("model.layers.1.self_attn.k_proj.weight", vec![48, 64]),
        ("model.layers.1.self_attn.q_proj.weight", vec![96, 64]),
    ],
)]
#[case::gemma3(
    ModelConfig::Gemma3(gemma3::Config::tiny()),
    4,
    &["model.layers.2.self_attn.q_norm.weight", "model.layers.2.self_attn.k_norm.weight"],
    &[
        ("model.layers.1.self_attn.q_norm.weight", vec![24]),
        ("model.layers.1.self_attn.k_proj.weight", vec![24, 64]),
    ],
)]
fn gemma_reads_transformers_parameter_names(
    #[case] mc: ModelConfig,
    #[case] layer: usize,
    #[case] own: &[&str],
    #[case] dims: &[(&str, Vec<usize>)],
) {
    let norms = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ]
    .map(|n| format!("model.layers.{layer}.{n}.weight"));
    let mut present = vec![
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight",
    ];
    present.extend(norms.iter().map(String::as_str));
    present.extend(own);
    let names = family_parameters(&mc, &present, dims);
    assert_tied_without_biases(&names);
}

/// Each of Gemma 2's own pieces changes the tiny model's logits: without it a test
/// against a reference that lacks it too would pass.
#[test]
fn gemma2_soft_caps_scalar_and_windows_reach_the_logits() {
    let base = assert_each_change_moves_logits(
        gemma2::Config::tiny,
        ModelConfig::Gemma2,
        // [2, 12], longer than the tiny window
        &long_prompt(),
        1e-2,
        &[
            ("no attention soft-cap", |c| {
                c.caps.attn_logit_softcapping = None
            }),
            ("no final soft-cap", |c| {
                c.caps.final_logit_softcapping = None
            }),
            ("query_pre_attn_scalar = head_dim", |c| {
                c.attn.query_pre_attn_scalar = 24
            }),
            ("no window", |c| c.attn.sliding_window = None),
            ("odd layers slide instead", |c| {
                c.attn.layer_types = Some(vec![
                    "full_attention".into(),
                    "sliding_attention".into(),
                    "full_attention".into(),
                ])
            }),
        ],
    );
    // The final cap bounds every logit.
    let cap = gemma2::Config::tiny().caps.final_logit_softcapping.unwrap() as f32;
    assert!(base.iter().all(|x| x.abs() < cap));
}
