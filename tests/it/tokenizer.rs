//! The built-in tokenizer: the committed `assets/tokenizer.json` is what the builder
//! makes (and is regenerated with `REGENERATE_TOKENIZER=1 cargo test --test it tokenizer::`),
//! it encodes exactly like `data::encode_bytes`, and it round-trips.

use std::path::PathBuf;

use prefix_harness::io::data::{decode_bytes, encode_bytes, SENTIMENT};
use prefix_harness::io::tokenizer::{byte_level_json, Tokenizer, BUILTIN_JSON, BUILTIN_VOCAB_SIZE};

fn asset_path() -> PathBuf {
    crate::common::repo("assets/tokenizer.json")
}

/// Texts beyond the built-in sentences: non-ASCII (2-, 3- and 4-byte UTF-8), control
/// characters, whitespace runs, GPT-2 regex bait (contractions, digits), the empty string.
const EXTRA: &[&str] = &[
    "",
    " ",
    "prefix — tuning",
    "naïve café, crème brûlée",
    "日本語のテキスト",
    "emoji 🦀🚀 and ZWJ 👩‍💻",
    "tabs\tand\nnewlines\r\n  double  spaces   ",
    "it's they're we've I'm you'll he'd 12345 3.14",
    "\u{0}\u{1}\u{7f}\u{80}\u{ff}",
    "Ω≈ç√∫˜µ≤≥÷",
];

#[test]
fn committed_tokenizer_json_matches_the_builder() {
    let built = byte_level_json().expect("builder serialises");
    if std::env::var_os("REGENERATE_TOKENIZER").is_some() {
        let path = asset_path();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &built).expect("write temp tokenizer.json");
        std::fs::rename(&tmp, &path).expect("rename tokenizer.json");
        println!("wrote {}", path.display());
        return;
    }
    assert!(
        BUILTIN_JSON == built,
        "assets/tokenizer.json differs from tokenizer::build_byte_level(); regenerate it \
         with `REGENERATE_TOKENIZER=1 cargo test --test it tokenizer::`"
    );
}

#[test]
fn builtin_equals_encode_bytes_on_the_built_in_sentences() {
    let tok = Tokenizer::builtin().expect("built-in tokenizer loads");
    assert_eq!(tok.vocab_size(), BUILTIN_VOCAB_SIZE);
    for (text, label) in SENTIMENT {
        for t in [*text, *label] {
            assert_eq!(tok.encode(t).expect("encode"), encode_bytes(t), "{t:?}");
        }
    }
}

#[test]
fn builtin_equals_encode_bytes_on_non_ascii_and_round_trips() {
    let tok = Tokenizer::builtin().expect("built-in tokenizer loads");
    for t in EXTRA {
        let ids = tok.encode(t).expect("encode");
        assert_eq!(ids, encode_bytes(t), "{t:?}");
        assert_eq!(tok.decode(&ids).expect("decode"), *t, "round trip {t:?}");
        assert_eq!(decode_bytes(&ids), *t, "data::decode_bytes agrees on {t:?}");
    }
}

#[test]
fn every_byte_has_its_own_id() {
    let tok = Tokenizer::builtin().expect("built-in tokenizer loads");
    let all: Vec<u32> = (0..=255u32).collect();
    for id in &all {
        let tokstr = tok
            .inner()
            .id_to_token(*id)
            .expect("every byte id has a token");
        assert_eq!(tok.token_to_id(&tokstr), Some(*id));
    }
    // Any byte sequence decodes like data::decode_bytes (lossy for invalid UTF-8).
    let invalid = [0xffu32, 0xfe, 97, 0xc3];
    assert_eq!(
        tok.decode(&invalid).expect("decode"),
        decode_bytes(&invalid)
    );
    assert_eq!(tok.decode(&all).expect("decode"), decode_bytes(&all));
}

#[test]
fn ids_outside_the_vocabulary_are_an_error() {
    let tok = Tokenizer::builtin().expect("built-in tokenizer loads");
    let err = tok.decode(&[97, 256]).expect_err("256 is not a byte");
    assert!(err.to_string().contains("id 256"), "{err}");
}

#[test]
fn from_file_reads_a_tokenizer_json_and_reports_bad_files() {
    let tok = Tokenizer::from_file(asset_path()).expect("committed file loads");
    assert_eq!(tok.encode("héllo").expect("encode"), encode_bytes("héllo"));

    let dir = std::env::temp_dir().join(format!("ph-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, "{\"model\": 3}").expect("write");
    let err = Tokenizer::from_file(&bad).expect_err("not a tokenizer");
    assert!(
        err.to_string().contains("tokenizer.json") && err.to_string().contains("not a valid"),
        "{err}"
    );
    let missing = dir.join("missing.json");
    let err = Tokenizer::from_file(&missing).expect_err("missing file");
    assert!(err.to_string().contains("missing.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
