//! Export for, and import from, the Python PEFT check (`ci/peft/check_adapter.py`).

use super::*;

/// `config.json` of the tiny model of `family` as transformers reads it.
fn hf_config(family: Family) -> serde_json::Value {
    let cfg = ModelConfig::tiny(family);
    let mut v = match &cfg {
        ModelConfig::Gpt2(c) => serde_json::to_value(c),
        ModelConfig::Llama(c) => serde_json::to_value(c),
        ModelConfig::Bloom(c) => serde_json::to_value(c),
        ModelConfig::GptBigcode(c) => serde_json::to_value(c),
        ModelConfig::T5(c) => serde_json::to_value(c),
        ModelConfig::Qwen2(c) => serde_json::to_value(c),
        ModelConfig::Mistral(c) => serde_json::to_value(c),
        ModelConfig::Qwen3(c) => serde_json::to_value(c),
        ModelConfig::Phi3(c) => serde_json::to_value(c),
        ModelConfig::GptNeox(c) => serde_json::to_value(c),
        ModelConfig::Gemma2(c) => serde_json::to_value(c),
        ModelConfig::Gemma3(c) => serde_json::to_value(c),
    }
    .expect("config to json");
    let obj = v.as_object_mut().expect("object");
    let (arch, extra): (&str, serde_json::Value) = match family {
        Family::Gpt2 => (
            "GPT2LMHeadModel",
            serde_json::json!({"activation_function": "gelu_new", "tie_word_embeddings": true,
                "bos_token_id": 0, "eos_token_id": 0}),
        ),
        Family::Llama => (
            "LlamaForCausalLM",
            serde_json::json!({"bos_token_id": 0, "eos_token_id": 0}),
        ),
        Family::Bloom => (
            "BloomForCausalLM",
            serde_json::json!({"tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0,
                "pretraining_tp": 1, "slow_but_exact": false}),
        ),
        Family::GptBigcode => (
            "GPTBigCodeForCausalLM",
            serde_json::json!({"activation_function": "gelu_pytorch_tanh",
                "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0}),
        ),
        Family::T5 => (
            "T5ForConditionalGeneration",
            serde_json::json!({"is_encoder_decoder": true}),
        ),
        Family::Qwen2
        | Family::Mistral
        | Family::Qwen3
        | Family::Phi3
        | Family::GptNeox
        | Family::Gemma2
        | Family::Gemma3 => (
            family.architecture(),
            serde_json::json!({"bos_token_id": 0, "eos_token_id": 0}),
        ),
    };
    obj.insert("model_type".into(), family.model_type().into());
    obj.insert("architectures".into(), serde_json::json!([arch]));
    obj.insert("dtype".into(), "float32".into());
    if let Some(e) = extra.as_object() {
        for (k, val) in e {
            obj.insert(k.clone(), val.clone());
        }
    }
    v
}

/// `PEFT_EXPORT_DIR`, or `None` after saying that nothing was `done` (written, read).
fn export_dir(done: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("PEFT_EXPORT_DIR").map(PathBuf::from);
    if dir.is_none() {
        println!("PEFT_EXPORT_DIR not set: nothing {done}");
    }
    dir
}

/// Our logits `[B, S, V]` for `ids: [B, S]` with `prefix` in a `dynamic` cache (T5:
/// `[B, T, V]` for the decoder ids `dec: [B, T]`).
fn dynamic_logits(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    ids: &Tensor,
    dec: Option<&Tensor>,
) -> Tensor {
    let cache = CacheConfig::new(CacheMode::Dynamic);
    forward_logits(model, Some(prefix), &cache, Ops::Kernels, ids, dec)
        .expect("forward")
        .0
}

/// Writes, per family and prefix kind, `FAMILY[-proj]/model/{config.json,
/// model.safetensors}`, `adapter/` and `ours.json` (input ids and our logits).
#[test]
#[ignore = "writes files for ci/peft/check_adapter.py; set PEFT_EXPORT_DIR"]
fn export_for_python() {
    let Some(root) = export_dir("written") else {
        return;
    };
    let dev = Device::Cpu;
    for family in Family::ALL {
        let mc = ModelConfig::tiny(family);
        let model = mc
            .build(weights::seeded(SEED, candle_core::DType::F32, &dev))
            .expect("model");
        let g = model.geometry();
        let map = weights::materialize(&mc, SEED, &dev).expect("weights");
        for projection in [false, true] {
            let name = format!("{}{}", family.name(), if projection { "-proj" } else { "" });
            let case = root.join(&name);
            let model_dir = case.join("model");
            std::fs::create_dir_all(&model_dir).expect("mkdir");
            let cfg_text = serde_json::to_string_pretty(&hf_config(family)).expect("json");
            std::fs::write(model_dir.join("config.json"), cfg_text).expect("config.json");
            let tensors: Vec<(String, Tensor)> =
                map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            save_safetensors(&model_dir.join("model.safetensors"), &tensors)
                .expect("model.safetensors");

            let prefix = prefix_with(model.as_ref(), 5, projection);
            save(
                &case.join("adapter"),
                &prefix,
                &g,
                Some(family.name()),
                None,
            )
            .expect("adapter");
            let ids = prompt(2, 6);
            let dec = if g.encoder_decoder {
                Some(prompt(2, 4))
            } else {
                None
            };
            let out = dynamic_logits(model.as_ref(), &prefix, &ids, dec.as_ref());
            let to_json = |t: &Tensor| -> serde_json::Value {
                serde_json::to_value(t.to_vec2::<u32>().expect("ids")).expect("json")
            };
            let ours = serde_json::json!({
                "family": family.name(),
                "projection": projection,
                "input_ids": to_json(&ids),
                "decoder_input_ids": dec.as_ref().map(to_json),
                "logits_shape": out.dims(),
                "logits": out.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("logits"),
            });
            std::fs::write(
                case.join("ours.json"),
                serde_json::to_string(&ours).expect("json"),
            )
            .expect("ours.json");
            println!("wrote {}", case.display());

            if let Some(dec) = &dec {
                // PEFT 0.21.2 replaces the cross-attention cache with an empty one: only
                // the self-attention prefix reaches the decoder. Our logits with the
                // cross prefix dropped, to tell that quirk apart from other differences.
                let quirk = root.join(format!("{name}-selfonly"));
                write_case_copy(&case, &quirk);
                let out = logits_self_prefix_only(model.as_ref(), &prefix, &ids, dec);
                let mut q = ours.clone();
                q["logits"] = serde_json::to_value(
                    out.flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("logits"),
                )
                .expect("json");
                std::fs::write(
                    quirk.join("ours.json"),
                    serde_json::to_string(&q).expect("json"),
                )
                .expect("ours.json");
                println!("wrote {}", quirk.display());
            }
        }
    }
}

/// Copy `model/` and `adapter/` of one export case to another folder.
fn write_case_copy(from: &Path, to: &Path) {
    for sub in ["model", "adapter"] {
        std::fs::create_dir_all(to.join(sub)).expect("mkdir");
        for e in std::fs::read_dir(from.join(sub)).expect("list") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), to.join(sub).join(e.file_name())).expect("copy");
        }
    }
}

/// Encoder-decoder logits `[B, T, V]` for `ids: [B, S]` and decoder ids `dec: [B, T]`
/// with the self-attention prefix only (cross-attention sees the encoder alone).
fn logits_self_prefix_only(
    model: &dyn Model,
    prefix: &PrefixEncoder,
    ids: &Tensor,
    dec: &Tensor,
) -> Tensor {
    use prefix_harness::engine::model::Ops;
    use prefix_harness::engine::prefix::extend_mask;
    let (b, s) = ids.dims2().expect("[B, S]");
    let t = dec.dim(1).expect("[B, T]");
    let p = prefix.geometry.num_virtual_tokens;
    let mut mc = prefix_cache(model, prefix, b, true);
    let dev = ids.device();
    let pad = Tensor::ones((b, s), candle_core::DType::F32, dev).expect("pad");
    let enc = model.encode(ids, &pad, Ops::Kernels).expect("encode");
    let mask = extend_mask(
        &Tensor::ones((b, t), candle_core::DType::F32, dev).expect("mask"),
        p,
    )
    .expect("mask");
    mc.next_step();
    pass(model, dec, &mut mc, &mask, Some(&enc)).expect("forward")
}

/// The other direction: adapters PEFT itself saved (`check_adapter.py
/// --write-peft-adapter`) load here and give PEFT's logits. Needs `PEFT_EXPORT_DIR` with
/// `CASE/peft/{adapter,logits.json}`; cases without them are skipped.
#[test]
#[ignore = "reads files written by ci/peft/check_adapter.py; set PEFT_EXPORT_DIR"]
fn import_from_python() {
    let Some(root) = export_dir("read") else {
        return;
    };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("list export dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("peft/logits.json").is_file())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no CASE/peft/logits.json under {}",
        root.display()
    );
    let dev = Device::Cpu;
    let mut worst = 0f32;
    for case in cases {
        let text = std::fs::read_to_string(case.join("model/config.json")).expect("config.json");
        let mc = ModelConfig::from_hf_json(&text).expect("config");
        let map = candle_core::safetensors::load(case.join("model/model.safetensors"), &dev)
            .expect("model.safetensors");
        let vb = candle_nn::VarBuilder::from_tensors(map, candle_core::DType::F32, &dev);
        let model = mc.build(vb).expect("model");
        let (cfg, prefix) =
            load_for(&case.join("peft/adapter"), &model.geometry(), &dev).expect("PEFT adapter");
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case.join("ours.json")).expect("ours.json"),
        )
        .expect("json");
        let peft: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case.join("peft/logits.json")).expect("logits.json"),
        )
        .expect("json");
        let ids_of = |v: &serde_json::Value| -> Tensor {
            let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).expect("ids");
            Tensor::new(rows, &dev).expect("ids tensor")
        };
        let ids = ids_of(&ours["input_ids"]);
        let dec =
            (!ours["decoder_input_ids"].is_null()).then(|| ids_of(&ours["decoder_input_ids"]));
        let out = dynamic_logits(model.as_ref(), &prefix, &ids, dec.as_ref());
        let shape: Vec<usize> =
            serde_json::from_value(peft["logits_shape"].clone()).expect("shape");
        let values: Vec<f32> = serde_json::from_value(peft["logits"].clone()).expect("logits");
        let theirs = Tensor::from_vec(values, shape, &dev).expect("tensor");
        let diff = max_abs_diff(&out, &theirs);
        println!(
            "{}: PEFT-written adapter (projection={}, P={}): max abs logit diff {diff:e}",
            case.file_name().unwrap_or_default().to_string_lossy(),
            cfg.prefix_projection,
            cfg.num_virtual_tokens
        );
        worst = worst.max(diff);
    }
    assert!(worst <= 1e-4, "max abs diff {worst}");
}
