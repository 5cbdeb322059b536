//! PEFT PREFIX_TUNING adapters: save -> load reproduces the logits exactly for every
//! family (flat and projection prefixes), the files are byte-for-byte what PEFT 0.21.2
//! writes, mismatches with the model are diagnosed before anything runs, and broken
//! files give clear errors.
//!
//! `export_for_python` (ignored by default) writes tiny models in Hugging Face format,
//! adapters and our logits for `ci/peft/check_adapter.py`:
//!
//! ```text
//! PEFT_EXPORT_DIR=/tmp/peft-check cargo test --test it adapter::python::export_for_python -- --ignored
//! python ci/peft/check_adapter.py /tmp/peft-check
//! ```

use crate::common::TempDir;

use std::path::{Path, PathBuf};

use crate::common::*;
use candle_core::{Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::diagnosis::DiagnosisClass;
use prefix_harness::engine::generate::forward_logits;
use prefix_harness::engine::model::{
    llama, weights, Family, Model, ModelConfig, ModelGeometry, Ops,
};
use prefix_harness::engine::prefix::{HeadDimFrom, HeadsFrom, PrefixConfig, PrefixEncoder};
use prefix_harness::io::adapter::{
    self, load, load_for, safetensors_bytes, save, save_safetensors, AdapterConfig, TaskType,
    CONFIG_FILE, TENSOR_NAME, WEIGHTS_FILE,
};

fn prefix_with(model: &dyn Model, p: usize, projection: bool) -> PrefixEncoder {
    let mut cfg = PrefixConfig::new(p);
    cfg.seed = SEED + 1;
    cfg.projection = projection;
    PrefixEncoder::new(&cfg, &model.geometry(), &Device::Cpu).expect("prefix builds")
}

/// Logits `[B, S, V]` of one forward pass (decoder ids for T5).
fn logits(model: &dyn Model, prefix: &PrefixEncoder, ids: &Tensor) -> Tensor {
    let dec = if model.geometry().encoder_decoder {
        Some(prompt(ids.dim(0).expect("batch"), 4))
    } else {
        None
    };
    forward_logits(
        model,
        Some(prefix),
        &CacheConfig::new(CacheMode::Dynamic),
        Ops::Kernels,
        ids,
        dec.as_ref(),
    )
    .expect("forward")
    .0
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn save_then_load_gives_identical_logits_for_every_family() {
    for family in Family::ALL {
        let model = tiny_model(family);
        let g = model.geometry();
        for projection in [false, true] {
            let prefix = prefix_with(model.as_ref(), 5, projection);
            let dir = TempDir::new(family.name());
            let written = save(dir.path(), &prefix, &g, Some("tiny"), None).expect("save");
            assert_eq!(written.prefix_projection, projection);
            assert_eq!(
                written.task(),
                Some(if g.encoder_decoder {
                    TaskType::Seq2SeqLm
                } else {
                    TaskType::CausalLm
                })
            );

            let (cfg, loaded) = load_for(dir.path(), &g, &Device::Cpu).expect("load");
            assert_eq!(cfg, written, "{family:?}: config round trip");
            assert_eq!(loaded.geometry, prefix.geometry, "{family:?}: geometry");
            assert!(loaded.transform.is_none(), "loaded adapters are flat");
            // prompt_embeddings [P, L*2*token_dim], bit for bit.
            let before = prefix.forward().expect("encoder output");
            let after = loaded.forward().expect("encoder output");
            assert_eq!(after.dims(), before.dims());
            assert_eq!(bits(&after), bits(&before), "{family:?}: prompt_embeddings");

            let ids = prompt(2, 6);
            let a = logits(model.as_ref(), &prefix, &ids);
            let b = logits(model.as_ref(), &loaded, &ids);
            let diff = max_abs_diff(&a, &b);
            println!("{family:?} projection={projection}: max abs logit diff {diff:e}");
            assert_eq!(diff, 0.0, "{family:?} projection={projection}");
            assert_eq!(bits(&a), bits(&b), "{family:?}: logits bit for bit");
        }
    }
}

/// What PEFT 0.21.2 wrote for `GPT2LMHeadModel(GPT2Config(vocab_size=256,
/// n_positions=128, n_embd=64, n_layer=2, n_head=4))` wrapped with
/// `PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
/// encoder_hidden_size=32)` and `save_pretrained` (see ci/peft/README.md).
const PEFT_GPT2_CONFIG: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "encoder_hidden_size": 32,
  "inference_mode": true,
  "init_weights": null,
  "modules_to_save": null,
  "num_attention_heads": 4,
  "num_layers": 2,
  "num_transformer_submodules": 1,
  "num_virtual_tokens": 5,
  "peft_type": "PREFIX_TUNING",
  "peft_version": "0.21.2",
  "prefix_projection": false,
  "revision": null,
  "task_type": "CAUSAL_LM",
  "token_dim": 64
}"#;

/// The safetensors header of that adapter (8-byte length, JSON, space padding).
const PEFT_GPT2_HEADER: &str = "{\"__metadata__\":{\"format\":\"pt\"},\"prompt_embeddings\":{\"dtype\":\"F32\",\"shape\":[5,256],\"data_offsets\":[0,5120]}}    ";

#[test]
fn files_are_byte_for_byte_what_peft_writes() {
    let model = tiny_model(Family::Gpt2);
    let g = model.geometry();
    let mut pc = PrefixConfig::new(5);
    pc.encoder_hidden_size = 32;
    let prefix = PrefixEncoder::new(&pc, &g, &Device::Cpu).expect("prefix");
    let dir = TempDir::new("peft-bytes");
    save(dir.path(), &prefix, &g, None, Some(TaskType::CausalLm)).expect("save");

    let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).expect("config");
    assert_eq!(text, PEFT_GPT2_CONFIG);

    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).expect("weights");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!(n, PEFT_GPT2_HEADER.len());
    assert_eq!(&bytes[8..8 + n], PEFT_GPT2_HEADER.as_bytes());
    assert_eq!(bytes.len(), 8 + n + 5 * 256 * 4);
    // No temporary files are left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![CONFIG_FILE.to_string(), WEIGHTS_FILE.to_string()]
    );
}

#[test]
fn safetensors_writer_round_trips_through_candle() {
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 12., &dev)
        .and_then(|t| t.reshape((3, 4)))
        .expect("a");
    let b = Tensor::new(&[1.5f32, -2.25, 1e-30], &dev).expect("b");
    let dir = TempDir::new("st");
    let path = dir.path().join("x.safetensors");
    save_safetensors(
        &path,
        &[("zeta".into(), b.clone()), ("alpha".into(), a.clone())],
    )
    .expect("save");
    let back = candle_core::safetensors::load(&path, &dev).expect("candle reads it");
    assert_eq!(bits(&back["alpha"]), bits(&a));
    assert_eq!(back["alpha"].dims(), &[3, 4]);
    assert_eq!(bits(&back["zeta"]), bits(&b));
    let bytes = safetensors_bytes(&[("alpha".into(), a)]).expect("bytes");
    assert_eq!((bytes.len() - 48) % 8, 0, "header padded to 8 bytes");
}

fn llama_geometry(edit: impl FnOnce(&mut llama::Config)) -> ModelGeometry {
    let mut c = llama::Config::tiny();
    edit(&mut c);
    ModelConfig::Llama(c).geometry()
}

/// A tiny Llama's adapter (P = 4) saved with these head settings.
fn saved_llama_adapter(tag: &str, heads_from: HeadsFrom, head_dim_from: HeadDimFrom) -> TempDir {
    let dir = TempDir::new(tag);
    let g = llama_geometry(|_| {});
    let mut pc = PrefixConfig::new(4);
    pc.heads_from = heads_from;
    pc.head_dim_from = head_dim_from;
    let prefix = PrefixEncoder::new(&pc, &g, &Device::Cpu).expect("prefix");
    save(&dir, &prefix, &g, Some("tiny-llama"), None).expect("save");
    dir
}

fn class_of(err: &prefix_harness::engine::diagnosis::EngineError) -> DiagnosisClass {
    err.diagnosis()
        .unwrap_or_else(|| panic!("expected a diagnosis, got {err}"))
        .class
}

/// Loading the adapter in `dir` for `g` is refused: the diagnosis class and the message.
fn refused(dir: &Path, g: &ModelGeometry) -> (DiagnosisClass, String) {
    let err = load_for(dir, g, &Device::Cpu).expect_err("a mismatch is refused");
    (class_of(&err), err.to_string())
}

#[test]
fn kv_heads_mismatch_is_diagnosed_before_running() {
    let dir = saved_llama_adapter("kvh", HeadsFrom::KvHeads, HeadDimFrom::Config);
    // Same model but 4 key/value heads instead of 2.
    let (class, msg) = refused(
        &dir,
        &llama_geometry(|c| c.core.num_key_value_heads = Some(4)),
    );
    assert_eq!(class, DiagnosisClass::KvHeads, "{msg}");
    assert!(
        msg.contains("num_attention_heads") && msg.contains('2') && msg.contains('4'),
        "{msg}"
    );
    println!("{msg}");
}

#[test]
fn adapter_built_with_attention_heads_names_peft_pr_1901() {
    let dir = saved_llama_adapter("attn-heads", HeadsFrom::AttentionHeads, HeadDimFrom::Config);
    let (class, msg) = refused(&dir, &llama_geometry(|_| {}));
    assert_eq!(class, DiagnosisClass::KvHeads);
    assert!(msg.contains("1901"), "{msg}");
    // Unchecked, it still loads with the geometry the file states (for reproductions).
    let a = load(&dir, &Device::Cpu).expect("load");
    let enc = a.prefix_encoder_unchecked().expect("unchecked");
    assert_eq!(enc.geometry.num_attention_heads, 4);
}

#[test]
fn head_dim_mismatch_is_diagnosed_before_running() {
    let dir = saved_llama_adapter("hd", HeadsFrom::KvHeads, HeadDimFrom::Config);
    let (class, msg) = refused(&dir, &llama_geometry(|c| c.head_dim = Some(16)));
    assert_eq!(class, DiagnosisClass::HeadDim, "{msg}");
    assert!(msg.contains("24") && msg.contains("16"), "{msg}");

    // hidden/heads instead of the config's head_dim (the PEFT < 0.18 bug).
    let dir = saved_llama_adapter("hd-bug", HeadsFrom::KvHeads, HeadDimFrom::HiddenOverHeads);
    let (class, msg) = refused(&dir, &llama_geometry(|_| {}));
    assert_eq!(class, DiagnosisClass::HeadDim);
    assert!(msg.contains("0.18"), "{msg}");
}

#[test]
fn layer_and_submodule_mismatches_are_shape_diagnoses() {
    let dir = saved_llama_adapter("layers", HeadsFrom::KvHeads, HeadDimFrom::Config);
    let (class, msg) = refused(
        &dir,
        &llama_geometry(|c| c.core.sizes.num_hidden_layers = 3),
    );
    assert_eq!(class, DiagnosisClass::Shape);
    assert!(msg.contains("num_layers"), "{msg}");

    // A causal-LM adapter on an encoder-decoder.
    let (class, msg) = refused(&dir, &ModelConfig::tiny(Family::T5).geometry());
    assert_eq!(class, DiagnosisClass::Shape);
    assert!(msg.contains("num_transformer_submodules"), "{msg}");
}

#[test]
fn too_many_virtual_tokens_for_learned_positions_is_a_position_diagnosis() {
    let dir = TempDir::new("pos");
    let model = tiny_model(Family::Gpt2);
    let mut g = model.geometry();
    let prefix = prefix_with(model.as_ref(), 8, false);
    save(dir.path(), &prefix, &g, None, None).expect("save");
    g.max_positions = Some(8);
    let err = load_for(dir.path(), &g, &Device::Cpu).expect_err("P >= n_positions");
    assert_eq!(class_of(&err), DiagnosisClass::Position);
}

fn saved_gpt2(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    let model = tiny_model(Family::Gpt2);
    let prefix = prefix_with(model.as_ref(), 3, false);
    save(dir.path(), &prefix, &model.geometry(), None, None).expect("save");
    dir
}

fn gpt2_geometry() -> ModelGeometry {
    ModelConfig::tiny(Family::Gpt2).geometry()
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let dir = saved_gpt2("trunc");
    let path = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).expect("read");
    for cut in [0, 4, 8, 40, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).expect("truncate");
        let err = load(dir.path(), &Device::Cpu).expect_err("truncated");
        let msg = err.to_string();
        assert!(
            msg.contains(WEIGHTS_FILE) && msg.contains("safetensors"),
            "{msg}"
        );
    }
}

#[test]
fn missing_files_and_bad_json_name_the_file() {
    let dir = saved_gpt2("missing");
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).expect("rm");
    let err = load(dir.path(), &Device::Cpu).expect_err("no weights");
    assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");

    std::fs::write(dir.path().join(adapter::LEGACY_WEIGHTS_FILE), b"pickle").expect("bin");
    let err = load(dir.path(), &Device::Cpu).expect_err("bin only");
    assert!(err.to_string().contains("adapter_model.bin"), "{err}");

    let dir = saved_gpt2("nocfg");
    std::fs::remove_file(dir.path().join(CONFIG_FILE)).expect("rm");
    let err = load(dir.path(), &Device::Cpu).expect_err("no config");
    assert!(err.to_string().contains(CONFIG_FILE), "{err}");

    let dir = saved_gpt2("badjson");
    std::fs::write(dir.path().join(CONFIG_FILE), "{\"peft_type\": ").expect("write");
    let err = load(dir.path(), &Device::Cpu).expect_err("bad json");
    assert!(err.to_string().contains(CONFIG_FILE), "{err}");

    let err = load(&dir.path().join("nope"), &Device::Cpu).expect_err("no folder");
    assert!(err.to_string().contains("not found"), "{err}");
}

#[test]
fn wrong_peft_type_and_missing_fields_are_named() {
    let dir = saved_gpt2("lora");
    let p = dir.path().join(CONFIG_FILE);
    let text = std::fs::read_to_string(&p).expect("read");
    std::fs::write(&p, text.replace("PREFIX_TUNING", "LORA")).expect("write");
    let err = load(dir.path(), &Device::Cpu).expect_err("lora");
    assert!(
        err.to_string().contains("peft_type") && err.to_string().contains("LORA"),
        "{err}"
    );

    std::fs::write(&p, "{\"peft_type\": \"PREFIX_TUNING\"}").expect("write");
    let err = load(dir.path(), &Device::Cpu).expect_err("no P");
    assert!(err.to_string().contains("num_virtual_tokens"), "{err}");
}

#[test]
fn unknown_fields_and_nulls_are_accepted_like_peft() {
    let dir = saved_gpt2("lenient");
    let p = dir.path().join(CONFIG_FILE);
    // An older PEFT file: no peft_version / init_weights, nulls PEFT fills from the
    // model, and a field this harness does not know.
    std::fs::write(
        &p,
        r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
            "token_dim": null, "num_layers": null, "num_attention_heads": null,
            "num_transformer_submodules": null, "some_future_field": [1, 2]}"#,
    )
    .expect("write");
    let (cfg, enc) = load_for(dir.path(), &gpt2_geometry(), &Device::Cpu).expect("lenient load");
    assert_eq!(cfg.peft_version, None);
    assert_eq!(enc.geometry.token_dim, 64);
    assert_eq!(enc.geometry.num_transformer_submodules, 1);
    // Without a model to fill them, the nulls are an error naming the field.
    let a = load(dir.path(), &Device::Cpu).expect("load");
    let err = a.prefix_encoder_unchecked().expect_err("nulls");
    assert!(err.to_string().contains("num_layers"), "{err}");
}

#[test]
fn wrong_tensor_name_and_shape_are_named() {
    let dir = saved_gpt2("tensor");
    let w = dir.path().join(WEIGHTS_FILE);
    let t = Tensor::zeros((3, 256), candle_core::DType::F32, &Device::Cpu).expect("t");
    save_safetensors(&w, &[("embedding.weight".into(), t)]).expect("save");
    let err = load(dir.path(), &Device::Cpu).expect_err("name");
    assert!(
        err.to_string().contains(TENSOR_NAME) && err.to_string().contains("embedding.weight"),
        "{err}"
    );

    // 4 rows for num_virtual_tokens 3.
    let t = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).expect("t");
    save_safetensors(&w, &[(TENSOR_NAME.into(), t)]).expect("save");
    let err = load(dir.path(), &Device::Cpu).expect_err("rows");
    assert_eq!(class_of(&err), DiagnosisClass::SeqLen, "{err}");
    assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");

    // Width of another model.
    let t = Tensor::zeros((3, 200), candle_core::DType::F32, &Device::Cpu).expect("t");
    save_safetensors(&w, &[(TENSOR_NAME.into(), t)]).expect("save");
    let err = load(dir.path(), &Device::Cpu).expect_err("width");
    assert_eq!(class_of(&err), DiagnosisClass::Shape, "{err}");

    // A projection-shaped tensor [P, token_dim] (someone saved embedding.weight under
    // the right name): a shape diagnosis, not a panic.
    let t = Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).expect("t");
    save_safetensors(&w, &[(TENSOR_NAME.into(), t)]).expect("save");
    let err = load(dir.path(), &Device::Cpu).expect_err("projection-shaped");
    assert_eq!(class_of(&err), DiagnosisClass::Shape, "{err}");
}

#[test]
fn config_text_parses_back() {
    let model = tiny_model(Family::T5);
    let prefix = prefix_with(model.as_ref(), 2, true);
    let cfg = AdapterConfig::for_prefix(&prefix, Some("t5-tiny"), TaskType::Seq2SeqLm);
    let text = cfg.to_json().expect("json");
    assert_eq!(
        AdapterConfig::from_json(&text, "x").expect("parse"),
        cfg,
        "{text}"
    );
    assert!(text.contains("\"num_transformer_submodules\": 2"));
    assert!(text.contains("\"task_type\": \"SEQ_2_SEQ_LM\""));
}

mod python;
