//! Save and load of every cache mode: each store reads back what it wrote, a ring keeps
//! its head, and a file of another mode, window or model, or a truncated or foreign
//! file, is refused with its name.

use super::*;
use crate::engine::cache::{CacheConfig, Layout};

/// A 2-layer cache in `mode` after a prefix of 3 and a step of 4 tokens:
/// keys `[1, 2, 7, 4]` (or fewer with a window).
fn filled(mode: CacheMode) -> ModelCache {
    let mut c = ModelCache::new(CacheConfig::new(mode), Layout::Standard, 2, false);
    let t = |s: usize, x: f32| {
        Tensor::arange(0f32, (2 * s * 4) as f32, &Device::Cpu)
            .and_then(|t| t.affine(1.0, x as f64))
            .and_then(|t| t.reshape((1, 2, s, 4)))
            .unwrap()
    };
    for layer in 0..2 {
        c.seed(layer, Attention::SelfAttn, t(3, 0.5), t(3, 1.5), 3)
            .unwrap();
        c.update_self(layer, &t(4, 2.5), &t(4, 3.5), (3, 7))
            .unwrap();
    }
    c
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ph-cache-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_store_reads_back_what_it_wrote() {
    for mode in [
        CacheMode::None,
        CacheMode::Dynamic,
        CacheMode::Static { max_len: 9 },
        CacheMode::Sliding { window: 5 },
        CacheMode::Rotating { window: 5 },
        CacheMode::Legacy,
    ] {
        let mut c = filled(mode);
        let path = temp(&format!("{}.safetensors", mode.name()));
        c.save(&path).unwrap();
        let mut back = c.emptied();
        back.restore(&path).unwrap();
        for layer in 0..2 {
            let (k, v) = c.stored_self(layer).unwrap();
            let (bk, bv) = back.stored_self(layer).unwrap();
            assert_eq!(values(&k), values(&bk), "{mode:?} layer {layer} keys");
            assert_eq!(values(&v), values(&bv), "{mode:?} layer {layer} values");
        }
        assert_eq!(back.past_len(), c.past_len(), "{mode:?}");
        assert_eq!(back.prefix_len(), 3, "{mode:?}");
    }
}

#[test]
fn a_ring_keeps_its_head_unless_the_historical_switch_drops_it() {
    let mut c = filled(CacheMode::Rotating { window: 5 });
    let t = Tensor::ones((1, 2, 1, 4), DType::F32, &Device::Cpu).unwrap();
    for layer in 0..2 {
        c.update_self(layer, &t, &t, (7, 8)).unwrap();
    }
    let path = temp("ring.safetensors");
    c.save(&path).unwrap();
    let head = |c: &ModelCache| c.layers[0].store.ring_head().unwrap_or(usize::MAX);
    assert_eq!(head(&c), 1);
    let mut back = c.emptied();
    back.restore(&path).unwrap();
    assert_eq!(head(&back), 1);
    let mut lost = c.emptied();
    lost.config.ring_head_lost_on_load = true;
    lost.restore(&path).unwrap();
    assert_eq!(head(&lost), 0);
}

fn restore_err(into: &mut ModelCache, path: &Path) -> String {
    match into.restore(path) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("restoring {} should fail", path.display()),
    }
}

#[test]
fn a_file_of_another_mode_window_or_model_is_refused_by_name() {
    let mut c = filled(CacheMode::Sliding { window: 5 });
    let path = temp("sliding.safetensors");
    c.save(&path).unwrap();
    let mut other = filled(CacheMode::Dynamic).emptied();
    let e = restore_err(&mut other, &path);
    assert!(e.contains("sliding.safetensors"), "{e}");
    assert!(e.contains("written by a `sliding` cache"), "{e}");
    let mut wider = ModelCache::new(
        CacheConfig::new(CacheMode::Sliding { window: 6 }),
        Layout::Standard,
        2,
        false,
    );
    assert!(restore_err(&mut wider, &path).contains("capacity Some(6)"));
    // A static cache's capacity is part of what must match.
    let mut st = filled(CacheMode::Static { max_len: 9 });
    let spath = temp("static.safetensors");
    st.save(&spath).unwrap();
    let mut bigger = ModelCache::new(
        CacheConfig::new(CacheMode::Static { max_len: 10 }),
        Layout::Standard,
        2,
        false,
    );
    assert!(restore_err(&mut bigger, &spath).contains("capacity Some(10)"));
    let mut deeper = ModelCache::new(
        CacheConfig::new(CacheMode::Sliding { window: 5 }),
        Layout::Standard,
        3,
        false,
    );
    let e = restore_err(&mut deeper, &path);
    assert!(e.contains("2 self-attention") && e.contains("has 3"), "{e}");
    let mut heads = c.emptied();
    heads.set_kv_heads(4);
    assert!(restore_err(&mut heads, &path).contains("2 key/value heads but this model has 4"));
}

#[test]
fn a_truncated_foreign_or_incomplete_file_is_a_clear_error() {
    let mut c = filled(CacheMode::Dynamic);
    let path = temp("dynamic.safetensors");
    c.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let cut = temp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = restore_err(&mut c.emptied(), &cut);
    assert!(
        e.contains("cut.safetensors") && e.contains("not a readable safetensors"),
        "{e}"
    );

    std::fs::write(&cut, &bytes[..20]).unwrap();
    assert!(restore_err(&mut c.emptied(), &cut).contains("truncated"));
    std::fs::write(&cut, &bytes[..4]).unwrap();
    assert!(restore_err(&mut c.emptied(), &cut).contains("shorter than"));

    let foreign = temp("foreign.safetensors");
    let t = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
    crate::io::adapter::save_safetensors(&foreign, &[("w".into(), t)]).unwrap();
    let e = restore_err(&mut c.emptied(), &foreign);
    assert!(
        e.contains("not a prefix-harness cache") && e.contains("`pt`"),
        "{e}"
    );

    // A state that announces a tensor the file does not hold.
    let at = bytes
        .windows(12)
        .position(|w| w == b"self.1.value")
        .unwrap();
    let mut renamed = bytes.clone();
    renamed[at + 11] = b'X';
    std::fs::write(&cut, &renamed).unwrap();
    let e = restore_err(&mut c.emptied(), &cut);
    assert!(e.contains("`self.1.value`") && e.contains("missing"), "{e}");

    let missing = temp("none-such.safetensors");
    assert!(restore_err(&mut c.emptied(), &missing).contains("cannot read"));
}

/// A quantized layer whose scales or zero points do not have the codes' per-channel
/// shape `[B, KVH, 1, D]` is refused, naming the tensor and its shape.
#[test]
fn a_quantized_file_with_misshapen_scales_or_zero_points_is_refused() {
    let mode = CacheMode::Quantized {
        bits: 8,
        residual: 2,
        prefix_full_precision: false,
    };
    let mut c = filled(mode);
    let path = temp("quantized.safetensors");
    c.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let state = serde_json::to_string(&read_state(&path, &bytes).unwrap()).unwrap();
    let meta = [
        ("format", FORMAT),
        ("version", VERSION),
        ("state", state.as_str()),
    ];
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    // The file as saved reads back.
    c.emptied().restore(&path).unwrap();
    for part in ["scale", "zero"] {
        let name = format!("self.0.key_{part}");
        // [1, 2, 1, 4] -> [1, 2, 1, 2]
        let edited: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, t)| match *k == name {
                true => (k.clone(), t.narrow(3, 0, 2).unwrap()),
                false => (k.clone(), t.clone()),
            })
            .collect();
        let bad = temp(&format!("bad-{part}.safetensors"));
        let written = crate::io::adapter::safetensors_bytes_with(&edited, &meta).unwrap();
        std::fs::write(&bad, written).unwrap();
        let e = restore_err(&mut c.emptied(), &bad);
        assert!(
            e.contains(&format!("`{name}` [1, 2, 1, 2]")) && e.contains("should be"),
            "{e}"
        );
    }
}
