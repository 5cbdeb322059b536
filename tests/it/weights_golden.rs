//! Committed golden digests of everything seeded: the initial weights of every tiny
//! family, the initial prefix parameters (flat and with the projection MLP), and the
//! built-in data batch. Seeded values come from integer arithmetic and IEEE basic
//! operations only (`src/engine/rng.rs`), so they must be bit-identical on every OS and CPU;
//! these digests are what the CI matrix (Linux, Windows, macOS) checks that against.
//!
//! The constants were produced by this code on linux x86_64; any platform must
//! reproduce them bit for bit. If a tiny config, a parameter name or an initialiser was
//! changed on purpose, update them from the failure message (it prints every value);
//! if nothing like that changed, seeded weights are no longer portable: find out why.

use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::model::{weights, Family, ModelConfig};
use prefix_harness::engine::prefix::{PrefixConfig, PrefixEncoder};
use prefix_harness::engine::rng::fnv1a;

/// Seed of the model weights and of the prefix parameters.
const WEIGHT_SEED: u64 = 7;
const PREFIX_SEED: u64 = 1;
const P: usize = 8;

/// (what, digest): `weights/<family>`, `prefix/<family>/{flat,projection}`, `data/...`.
const GOLDEN: &[(&str, &str)] = &[
    ("weights/gpt2", "39e188d64b917cac"),            // 124672 values
    ("prefix/gpt2/flat", "4f32b82fd0d0a3c8"),        // 2048 values
    ("prefix/gpt2/projection", "80b1096fbb40a374"),  // 11040 values
    ("weights/llama", "8314e7f283f71c5e"),           // 119104 values
    ("prefix/llama/flat", "4a2d2d52a5cde89c"),       // 1536 values
    ("prefix/llama/projection", "80e7207b8aaa4b26"), // 8288 values
    ("weights/bloom", "5f6a59fb3035d4bf"),           // 116608 values
    ("prefix/bloom/flat", "4f32b82fd0d0a3c8"),       // 2048 values
    ("prefix/bloom/projection", "80b1096fbb40a374"), // 11040 values
    ("weights/gpt_bigcode", "fc7acee08210d2b9"),     // 112192 values
    ("prefix/gpt_bigcode/flat", "877e83b94be4a2f3"), // 512 values
    ("prefix/gpt_bigcode/projection", "8c9e3ba585372645"), // 2784 values
    ("weights/t5", "a1aff79a60f89d02"),              // 230400 values
    ("prefix/t5/flat", "2781f7e640d9df4b"),          // 3072 values
    ("prefix/t5/projection", "84d84fc5e7138f1c"),    // 16544 values
    ("weights/qwen2", "a451d1f0313216c4"),           // 121568 values
    ("prefix/qwen2/flat", "ae4ce058717fb8f4"),       // 768 values
    ("prefix/qwen2/projection", "9f3e6359eecb3cfd"), // 3840 values
    ("weights/mistral", "3d55e32b585d250f"),         // 137664 values
    ("prefix/mistral/flat", "ae4ce058717fb8f4"),     // 768 values (same shapes as qwen2)
    ("prefix/mistral/projection", "9f3e6359eecb3cfd"), // 3840 values
    ("weights/qwen3", "d81879830c12250d"),           // 146000 values
    ("prefix/qwen3/flat", "aab7b02832ad848d"),       // 2304 values
    ("prefix/qwen3/projection", "210881feec6a58c4"), // 11456 values
    ("weights/phi3", "6ad61e9ac1903658"),            // 125376 values
    ("prefix/phi3/flat", "4a2d2d52a5cde89c"),        // 1536 values
    ("prefix/phi3/projection", "97c6cf36dd17fe90"),  // 7648 values
    ("weights/gpt_neox", "ba660aaf1a1b7862"),        // 108096 values
    ("prefix/gpt_neox/flat", "4f32b82fd0d0a3c8"),    // 2048 values
    ("prefix/gpt_neox/projection", "80b1096fbb40a374"), // 11040 values
    ("weights/gemma2", "4d542cc2a7da7c34"),          // 127808 values
    ("prefix/gemma2/flat", "aab7b02832ad848d"),      // 2304 values
    ("prefix/gemma2/projection", "210881feec6a58c4"), // 11456 values
    ("weights/gemma3", "aba4633a49e9156f"),          // 186928 values
    ("prefix/gemma3/flat", "c8350dff3cc70d94"),      // 1920 values
    ("prefix/gemma3/projection", "6633b953f2eaa133"), // 8912 values
    ("data/default-batch-3x16", "d3dc0e53abe2adcb"), // 48 values
];

/// Combine named tensors, in sorted name order, into one digest: each tensor's
/// [`weights::digest`] (dims and exact f32 bits) with its name.
fn combine<'a>(named: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> String {
    let mut named: Vec<(&str, &Tensor)> = named.into_iter().collect();
    named.sort_by_key(|(n, _)| *n);
    let mut bytes = vec![];
    for (name, t) in named {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        let d = weights::digest(t).expect("digest");
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    format!("{:016x}", fnv1a(&bytes))
}

fn actual() -> Vec<(String, String, usize)> {
    let dev = Device::Cpu;
    let mut out = vec![];
    for family in Family::ALL {
        let cfg = ModelConfig::tiny(family);
        let w = weights::materialize(&cfg, WEIGHT_SEED, &dev).expect("weights");
        let params: usize = w.values().map(|t| t.elem_count()).sum();
        out.push((
            format!("weights/{}", family.name()),
            combine(w.iter().map(|(n, t)| (n.as_str(), t))),
            params,
        ));
        for projection in [false, true] {
            let mut pc = PrefixConfig::new(P);
            pc.seed = PREFIX_SEED;
            pc.projection = projection;
            let enc = PrefixEncoder::new(&pc, &cfg.geometry(), &dev).expect("prefix");
            let vars = enc.vars();
            let tensors: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            out.push((
                format!(
                    "prefix/{}/{}",
                    family.name(),
                    if projection { "projection" } else { "flat" }
                ),
                combine(tensors.iter().map(|(n, t)| (n.as_str(), t))),
                tensors.iter().map(|(_, t)| t.elem_count()).sum(),
            ));
        }
    }
    let prompts = prefix_harness::io::data::default_prompts();
    let (ids, mask) = prefix_harness::io::data::batch(&prompts, 3, 16, 0, &dev).expect("batch");
    let ids = ids.to_dtype(DType::F32).unwrap();
    out.push((
        "data/default-batch-3x16".into(),
        combine([("ids", &ids), ("mask", &mask)]),
        ids.elem_count(),
    ));
    out
}

#[test]
fn seeded_weights_prefixes_and_data_match_the_committed_digests() {
    let got = actual();
    let table: String = got
        .iter()
        .map(|(k, v, n)| format!("    (\"{k}\", \"{v}\"), // {n} values\n"))
        .collect();
    let keys: Vec<&str> = got.iter().map(|(k, _, _)| k.as_str()).collect();
    let golden_keys: Vec<&str> = GOLDEN.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys, golden_keys,
        "the golden table lists other items:\n{table}"
    );
    let wrong: Vec<String> = got
        .iter()
        .zip(GOLDEN)
        .filter(|((_, v, _), (_, g))| v != g)
        .map(|((k, v, _), (_, g))| format!("{k}: expected {g}, got {v}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "seeded values differ from the digests produced on linux x86_64 ({} on {}):\n{}\n\nthis platform's table:\n{table}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        wrong.join("\n")
    );
}

/// The digest really sees every bit: flipping one bit of one weight changes it.
#[test]
fn one_flipped_bit_changes_the_digest() {
    let dev = Device::Cpu;
    let w = weights::materialize(&ModelConfig::tiny(Family::Gpt2), WEIGHT_SEED, &dev).unwrap();
    let base = combine(w.iter().map(|(n, t)| (n.as_str(), t)));
    let (name, t) = w.iter().min_by_key(|(n, _)| n.as_str()).unwrap();
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[0] = f32::from_bits(v[0].to_bits() ^ 1);
    let flipped = Tensor::from_vec(v, t.shape(), &dev).unwrap();
    let mut w2 = w.clone();
    w2.insert(name.clone(), flipped);
    assert_ne!(combine(w2.iter().map(|(n, t)| (n.as_str(), t))), base);
}
