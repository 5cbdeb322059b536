//! GPT-NeoX: `config.json` with transformers' defaults (4.x spelling `rotary_pct` /
//! `rotary_emb_base` and 5.x `rope_parameters`), parameter names, and that
//! `use_parallel_residual` and `rotary_pct` reach the logits. candle-transformers 0.11
//! has no GPT-NeoX: the logits are checked against transformers + PEFT
//! (`scenarios/stack/phi3-neox.yaml`).

use candle_core::{Device, Tensor};

use crate::common::{assert_each_change_moves_logits, family_parameters, family_parser};
use prefix_harness::engine::model::{gpt_neox, ModelConfig};

family_parser!(GptNeox, gpt_neox::Config);

#[test]
fn gpt_neox_config_json_defaults() {
    // Absent: GPT-NeoX-20B's defaults.
    let d = parse(r#"{"model_type": "gpt_neox", "num_hidden_layers": 2}"#);
    assert_eq!(
        (d.sizes.hidden_size, d.sizes.num_attention_heads),
        (6144, 64)
    );
    assert_eq!(d.rotary_ndims(), 24); // int(96 * 0.25)
    assert!(d.use_parallel_residual && d.attention_bias && !d.sizes.tie_word_embeddings);
    assert_eq!(d.hidden_act, "gelu");
    // Pythia-70m's fields.
    let p = parse(
        r#"{"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 8,
            "num_hidden_layers": 6, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "intermediate_size": 2048, "vocab_size": 50304}"#,
    );
    assert_eq!(p.rotary_ndims(), 16);
    // transformers 5's rope_parameters replace rotary_pct.
    let t5 = parse(
        r#"{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5}}"#,
    );
    assert_eq!(t5.rotary_ndims(), 8);
    // Odd rotary dimensions and unknown activations are refused.
    for bad in [
        r#"{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.1875}"#,
        r#"{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "hidden_act": "relu"}"#,
    ] {
        let e = ModelConfig::from_hf_json(bad).unwrap_err().to_string();
        assert!(e.contains("gpt_neox"), "{bad}: {e}");
    }
}

#[test]
fn gpt_neox_reads_transformers_parameter_names() {
    family_parameters(
        &ModelConfig::GptNeox(gpt_neox::Config::tiny()),
        &[
            "gpt_neox.embed_in.weight",
            "gpt_neox.layers.1.attention.query_key_value.weight",
            "gpt_neox.layers.1.attention.query_key_value.bias",
            "gpt_neox.layers.0.attention.dense.bias",
            "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
            "gpt_neox.layers.0.post_attention_layernorm.bias",
            "gpt_neox.final_layer_norm.weight",
            "embed_out.weight",
        ],
        &[],
    );
}

#[test]
fn residual_style_and_rotary_pct_reach_the_logits() {
    assert_each_change_moves_logits(
        gpt_neox::Config::tiny,
        ModelConfig::GptNeox,
        // [2, 5]
        &Tensor::new(&[[1u32, 17, 42, 99, 3], [5, 200, 13, 77, 0]], &Device::Cpu).unwrap(),
        1e-3,
        &[
            ("sequential residual", |c| c.use_parallel_residual = false),
            ("rotary on the whole head", |c| c.rotary_pct = 1.0),
        ],
    );
}
