//! `src/io/hub/`: resolution and loading errors.

use super::*;
use crate::common::{assert_contains, max_abs_diff, pass};

fn probe_logits(model: &dyn Model) -> Tensor {
    let mut cache = ModelCache::new(
        CacheConfig::new(CacheMode::Dynamic),
        model.family().legacy_layout(),
        model.geometry().num_layers,
        false,
    );
    let mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu).expect("mask");
    pass(model, &ids(&[vec![5, 6, 7]]), &mut cache, &mask, None).expect("forward")
}

/// The message of resolving hub `repo` at `revision`, which must fail (`why`).
fn resolve_error(opts: &HubOptions, repo: &str, revision: Option<&str>, why: &str) -> String {
    ModelSource::hub(repo, revision)
        .expect("source")
        .resolve(opts)
        .expect_err(why)
        .to_string()
}

#[test]
fn local_folder_and_hub_cache_give_the_same_model() {
    let dev = Device::Cpu;
    let folder = fixtures().join("models/gpt2");
    let (cfg_a, a, tok) = hub::load_model(&ModelSource::path(&folder), &dev).expect("folder");
    assert!(tok.is_none());
    let cache = TempDir::new("same");
    add_repo(cache.path(), "fixtures/gpt2", &folder, RefStyle::Plain);
    let opts = HubOptions::with_cache_dir(cache.path());
    let src = ModelSource::hub("fixtures/gpt2", Some("main")).expect("source");
    let files = src.resolve(&opts).expect("resolve");
    assert!(files
        .dir
        .ends_with(format!("snapshots/{}", commit_of("fixtures/gpt2"))));
    assert_eq!(files.weights, vec![files.dir.join(hub::WEIGHTS_FILE)]);
    let (cfg_b, b, _) = hub::load_model_with(&src, &opts, &dev).expect("hub");
    assert_eq!(cfg_a, cfg_b);
    assert_eq!(
        max_abs_diff(&probe_logits(a.as_ref()), &probe_logits(b.as_ref())),
        0.0
    );
}

#[test]
fn refs_with_a_newline_and_commit_hash_revisions_resolve() {
    let folder = fixtures().join("models/gpt2");
    let cache = TempDir::new("refs");
    add_repo(cache.path(), "org/newline", &folder, RefStyle::Newline);
    let commit = add_repo(cache.path(), "org/noref", &folder, RefStyle::None);
    let opts = HubOptions::with_cache_dir(cache.path());
    let nl = ModelSource::hub("org/newline", None).expect("source");
    assert!(nl.resolve(&opts).is_ok(), "trailing newline in refs/main");
    let by_hash = ModelSource::hub("org/noref", Some(&commit)).expect("source");
    assert!(by_hash
        .resolve(&opts)
        .expect("commit revision")
        .dir
        .ends_with(&commit));
    // Without a ref, `main` is not cached.
    assert_contains(
        &resolve_error(&opts, "org/noref", None, "no ref"),
        "refs/main",
    );

    // A ref whose snapshot is gone (a partial or moved cache).
    let repo = cache.path().join("models--org--newline");
    std::fs::remove_dir_all(repo.join("snapshots")).expect("rm snapshots");
    let err = nl.resolve(&opts).expect_err("snapshot missing");
    assert!(
        err.to_string().contains("names a snapshot that is missing"),
        "{err}"
    );

    // A snapshot without the weights: the error names the snapshot and the file.
    let commit = add_repo(cache.path(), "org/partial", &folder, RefStyle::Plain);
    let snap = cache
        .path()
        .join("models--org--partial/snapshots")
        .join(&commit);
    std::fs::remove_file(snap.join(hub::WEIGHTS_FILE)).expect("rm weights");
    let msg = resolve_error(&opts, "org/partial", None, "no weights");
    assert!(
        msg.contains(&snap.join(hub::WEIGHTS_FILE).display().to_string()),
        "{msg}"
    );
}

#[test]
fn a_repository_that_is_not_cached_names_the_paths_and_how_to_fetch_it() {
    let cache = TempDir::new("missing");
    let opts = HubOptions::with_cache_dir(cache.path());
    let msg = resolve_error(&opts, "org/absent", Some("v2"), "not cached");
    println!("{msg}");
    for want in [
        "hub org/absent@v2",
        "models--org--absent/refs/v2",
        &cache.path().display().to_string(),
        "huggingface-cli download org/absent --revision v2",
        "never downloads",
        "model: {path: DIR}",
    ] {
        assert!(msg.contains(want), "missing `{want}` in: {msg}");
    }

    // The repository is there, the revision is not: the ref and snapshot paths searched
    // and what is cached.
    add_repo(
        cache.path(),
        "org/present",
        &fixtures().join("models/gpt2"),
        RefStyle::Plain,
    );
    let msg = resolve_error(&opts, "org/present", Some("v2"), "no such revision");
    println!("{msg}");
    assert!(
        msg.contains("models--org--present/refs/v2")
            && msg.contains("snapshots/<commit>/config.json"),
        "{msg}"
    );
    assert!(msg.contains("cached refs: main"), "{msg}");

    // A cache folder that does not exist at all.
    let opts = HubOptions::with_cache_dir(cache.path().join("nope"));
    assert_contains(
        &resolve_error(&opts, "org/x", None, "no cache"),
        "does not exist",
    );
}

/// Copy a fixture model folder into a fresh temporary folder to break it.
fn model_copy(tag: &str, model: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for e in std::fs::read_dir(fixtures().join("models").join(model)).expect("list") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match hub::load_model(&ModelSource::path(dir), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_folders_give_clear_errors() {
    // Truncated and corrupt weights name the file.
    let dir = model_copy("trunc", "gpt2");
    let w = dir.path().join(hub::WEIGHTS_FILE);
    let bytes = std::fs::read(&w).expect("read");
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&w, &bytes[..cut]).expect("truncate");
        let msg = load_err(dir.path());
        assert!(
            msg.contains(&w.display().to_string()) && msg.contains("safetensors"),
            "{msg}"
        );
    }
    let mut bad = bytes.clone();
    bad[9] = b'!';
    std::fs::write(&w, &bad).expect("corrupt");
    assert!(load_err(dir.path()).contains("not a valid safetensors file"));

    // No weights; pickle weights only.
    std::fs::remove_file(&w).expect("rm");
    let msg = load_err(dir.path());
    assert!(
        msg.contains(hub::WEIGHTS_FILE) && msg.contains("config.json"),
        "{msg}"
    );
    std::fs::write(dir.path().join(hub::PICKLE_WEIGHTS_FILE), b"pickle").expect("bin");
    assert!(load_err(dir.path()).contains("only safetensors"));

    // Unsupported model_type lists the supported families.
    let dir = model_copy("mt", "gpt2");
    let c = dir.path().join(hub::CONFIG_FILE);
    let text = std::fs::read_to_string(&c).expect("config");
    std::fs::write(&c, text.replace("\"gpt2\"", "\"mamba\"")).expect("write");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("mamba")
            && msg.contains("gpt2, llama, bloom, gpt_bigcode, t5, qwen2, mistral, qwen3"),
        "{msg}"
    );
    assert!(msg.contains(&c.display().to_string()), "{msg}");

    // No config.json; no folder.
    std::fs::remove_file(&c).expect("rm");
    assert!(load_err(dir.path()).contains("no config.json"));
    assert!(load_err(&dir.path().join("absent")).contains("not found"));

    // Weights of another model: the missing tensor is named.
    let dir = model_copy("other", "gpt2");
    std::fs::copy(
        fixtures().join("models/bloom").join(hub::WEIGHTS_FILE),
        dir.path().join(hub::WEIGHTS_FILE),
    )
    .expect("copy");
    let msg = load_err(dir.path());
    assert!(msg.contains("wte") || msg.contains("transformer"), "{msg}");
}

#[test]
fn sharded_checkpoints_load_like_one_file() {
    let dev = Device::Cpu;
    let src = fixtures().join("models/llama-gqa");
    let dir = TempDir::new("shards");
    std::fs::copy(
        src.join(hub::CONFIG_FILE),
        dir.path().join(hub::CONFIG_FILE),
    )
    .expect("config");
    let all = candle_core::safetensors::load(src.join(hub::WEIGHTS_FILE), &dev).expect("weights");
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: Vec<(String, Tensor)> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        adapter::save_safetensors(&dir.path().join(shard), &tensors).expect("shard");
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.path().join(hub::WEIGHTS_INDEX_FILE), index.to_string()).expect("index");
    let source = ModelSource::path(dir.path());
    let files = source
        .resolve(&HubOptions::with_cache_dir(""))
        .expect("resolve");
    assert_eq!(files.weights.len(), 2);
    let (_, sharded, _) = hub::load_model(&source, &dev).expect("sharded");
    let (_, single, _) = hub::load_model(&ModelSource::path(&src), &dev).expect("single");
    assert_eq!(
        max_abs_diff(
            &probe_logits(sharded.as_ref()),
            &probe_logits(single.as_ref())
        ),
        0.0
    );

    // A shard the index names but that is missing.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let msg = load_err(dir.path());
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("not found"),
        "{msg}"
    );
}

/// A run takes the checkpoint's own `tokenizer.json` (here a word-level one that maps
/// `hi` to id 7, where the built-in byte tokenizer gives 104, 105) unless the scenario
/// names a tokenizer.
#[test]
fn a_run_encodes_prompts_with_the_checkpoints_own_tokenizer() {
    use prefix_harness::harness::{run, scenario};
    let dir = model_copy("own-tok", "gpt2");
    let word_level = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hi": 7}, "unk_token": "[UNK]"}}"#;
    std::fs::write(dir.path().join(hub::TOKENIZER_FILE), word_level).expect("tokenizer");
    let prepared_ids = |extra: &str| {
        let yaml = format!(
            "name: own-tok\nmodel:\n  path: .\n{extra}prefix:\n  virtual_tokens: 2\n\
             data:\n  prompts: [hi]\n  batch_size: 1\n"
        );
        let file = dir.path().join("s.yaml");
        std::fs::write(&file, yaml).expect("scenario");
        let case = scenario::load(&file).expect("scenario").remove(0);
        let p = run::prepare(&case).unwrap_or_else(|e| panic!("prepare: {e}"));
        p.ids.to_vec2::<u32>().expect("ids")
    };
    assert_eq!(prepared_ids(""), vec![vec![7]]);
    assert_eq!(prepared_ids("tokenizer: builtin\n"), vec![vec![104, 105]]);
}

#[test]
fn a_folder_with_tokenizer_json_loads_it() {
    let dir = model_copy("tok", "gpt2");
    std::fs::write(
        dir.path().join(hub::TOKENIZER_FILE),
        prefix_harness::io::tokenizer::BUILTIN_JSON,
    )
    .expect("tokenizer");
    let (_, _, tok) = hub::load_model(&ModelSource::path(dir.path()), &Device::Cpu).expect("load");
    let tok = tok.expect("tokenizer loaded");
    assert_eq!(tok.encode("hi").expect("encode"), vec![104, 105]);
    std::fs::write(dir.path().join(hub::TOKENIZER_FILE), "{").expect("broken");
    assert!(load_err(dir.path()).contains("tokenizer.json"));
}
