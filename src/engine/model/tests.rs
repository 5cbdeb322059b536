//! Unit tests of the model configs: the defaults files, the GELU names, the tiny
//! configs; and the helpers the model files' unit tests share ([`every_tiny_config`],
//! [`config_json`]).

use super::*;

/// Each family with its tiny config ([`ModelConfig::tiny`]), in `Family::ALL`'s order.
pub(super) fn every_tiny_config() -> impl Iterator<Item = (Family, ModelConfig)> {
    Family::ALL.into_iter().map(|f| (f, ModelConfig::tiny(f)))
}

/// `cfg` written as its family's Hugging Face `config.json` (a JSON object): its fields,
/// with `model_type` in place of the `family` tag.
pub(super) fn config_json(cfg: &ModelConfig) -> serde_json::Value {
    let mut json = serde_json::to_value(cfg).expect("a config serialises");
    let fields = json
        .as_object_mut()
        .expect("a config serialises to a mapping");
    fields.remove("family");
    fields.insert("model_type".into(), cfg.family().model_type().into());
    json
}

/// Each defaults file parses, gives every field of its family's config (a field it
/// lacks would be required in every `config.json`), and names only fields the config
/// has (a misspelt key would be ignored).
#[test]
fn defaults_files_cover_each_config() {
    let mut checked = 0;
    for (family, tiny) in every_tiny_config() {
        let Some(text) = family.hf_defaults() else {
            continue;
        };
        let defaults: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).expect("a JSON object");
        let json = format!(r#"{{"model_type": "{}"}}"#, family.model_type());
        let parsed =
            ModelConfig::from_hf_json(&json).unwrap_or_else(|e| panic!("{}: {e}", family.name()));
        assert_eq!(parsed.family(), family);
        let serde_json::Value::Object(fields) = serde_json::to_value(&parsed).unwrap() else {
            panic!("a config serialises to a mapping")
        };
        let tiny = config_json(&tiny);
        for field in tiny.as_object().unwrap().keys() {
            assert!(
                field == "model_type" || defaults.contains_key(field),
                "{}: no default for `{field}`",
                family.name()
            );
        }
        for (field, value) in &defaults {
            assert!(
                value.is_null() || fields.get(field) == Some(value),
                "{}: the default `{field}: {value}` is not what the parsed config holds",
                family.name()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}

/// The GELU names transformers' configs use, each with the GELU it means.
#[test]
fn gelu_names() {
    let tanh = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"].map(|n| (n, Gelu::Tanh));
    for (name, gelu) in [[("gelu", Gelu::Erf)].as_slice(), &tanh].concat() {
        assert!(Gelu::NAMES.contains(&name), "{name}");
        assert_eq!(Gelu::named(name), gelu, "{name}");
    }
}

/// GPT-2 and Bloom read an absent `layer_norm_epsilon` as transformers' 1e-5.
#[test]
fn layer_norm_eps_default() {
    for family in [Family::Gpt2, Family::Bloom] {
        let mut json = config_json(&ModelConfig::tiny(family));
        json.as_object_mut().unwrap().remove("layer_norm_epsilon");
        let eps = match ModelConfig::from_hf_json(&json.to_string()).unwrap() {
            ModelConfig::Gpt2(c) => c.layer_norm_epsilon,
            ModelConfig::Bloom(c) => c.layer_norm_epsilon,
            other => panic!("{family:?} parsed as {:?}", other.family()),
        };
        assert_eq!(eps, 1e-5, "{}", family.name());
    }
}

/// Each family's tiny config file parses as that family's `config.json`, and is
/// complete: the same config with or without the defaults merged in.
#[test]
fn tiny_configs() {
    for (family, tiny) in every_tiny_config() {
        assert_eq!(tiny.family(), family);
        let parsed = ModelConfig::from_hf_json(&config_json(&tiny).to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", family.name()));
        assert_eq!(parsed, tiny, "{}", family.name());
    }
}

/// A `rope_parameters` field a family does not run is refused (when the config is
/// parsed, or at the latest when the model is built), naming the family and the field,
/// never ignored: GPT-NeoX's legacy `type: linear` (it runs default RoPE
/// only), and a `partial_rotary_factor` other than 1 in every other family that reads
/// `rope_parameters` (they rotate whole heads). The same config without the field
/// parses.
#[test]
fn rope_parameters_a_family_does_not_run_are_refused() {
    let partial = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5});
    let load = |json: &serde_json::Value| {
        let device = candle_core::Device::Cpu;
        ModelConfig::from_hf_json(&json.to_string())
            .and_then(|c| c.build(weights::seeded(1, candle_core::DType::F32, &device)))
            .map(|_| ())
    };
    let mut refused = vec![];
    for (family, tiny) in every_tiny_config() {
        let (key, bad) = match family {
            Family::GptNeox => (
                "linear",
                serde_json::json!({"type": "linear", "factor": 2.0}),
            ),
            Family::Gemma3 => (
                "partial_rotary_factor",
                serde_json::json!({"full_attention": partial, "sliding_attention": {}}),
            ),
            Family::Gpt2 | Family::Bloom | Family::GptBigcode | Family::T5 => continue,
            _ => ("partial_rotary_factor", partial.clone()),
        };
        let mut json = config_json(&tiny);
        json["rope_parameters"] = bad;
        let e = load(&json).expect_err(family.name()).to_string();
        assert!(e.contains(family.name()) && e.contains(key), "{e}");
        // The field is what is refused: with a full rotation (a default type) it parses.
        match family {
            Family::GptNeox => json["rope_parameters"] = serde_json::json!({"type": "default"}),
            Family::Gemma3 => {
                json["rope_parameters"]["full_attention"]["partial_rotary_factor"] = 1.0.into()
            }
            _ => json["rope_parameters"]["partial_rotary_factor"] = 1.0.into(),
        }
        load(&json).unwrap_or_else(|e| panic!("{}: {e}", family.name()));
        refused.push(family);
    }
    assert_eq!(refused.len(), 8, "{refused:?}");
}
