//! The cache's own checks, turned into diagnoses: whether new keys and values may be
//! appended to what a layer holds (`check_append`), whether a preallocated store has
//! room for them (`check_capacity`), where what a window store gives the attention
//! begins (`check_window`), and selecting batch rows of a stored tensor in any layout
//! (`select_rows`, for beams).

use candle_core::{DType, Tensor};

use super::stores::Capacity;
use super::{CacheMode, Layout};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, Result, Site, TensorKind,
};

/// Rows `indices` (`[N']`) of a stored tensor `t` held in `layout`: standard
/// `[N, KVH, K, D]` and bigcode-fused `[N, K, 2D]` along dimension 0; bloom-legacy
/// `[N*KVH, D, K]` / `[N*KVH, K, D]` through the view `[N, KVH, ...]`. Returns the same
/// layout with N' rows.
pub(super) fn select_rows(
    t: &Tensor,
    layout: Layout,
    tensor: TensorKind,
    kv_heads: Option<usize>,
    indices: &[u32],
    site: Site,
) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rank = match layout {
        Layout::Standard => 4,
        Layout::BloomLegacy | Layout::BigcodeFused => 3,
    };
    if dims.len() != rank {
        return Err(Diagnosis::new(
            DiagnosisClass::Rank,
            format!(
                "cannot select batch rows: the cache stores {} {tensor}s {} but holds a {}-D tensor {dims:?}",
                layout.name(),
                layout.dims_text(tensor),
                dims.len()
            ),
        )
        .at(site.layer, site.attention, tensor)
        .shapes(&vec![0; rank], &dims)
        .hint(rank_hint(layout, dims.len()))
        .into());
    }
    let group = match layout {
        Layout::BloomLegacy => kv_heads.ok_or_else(|| {
            crate::engine::diagnosis::EngineError::Config(
                "reordering a bloom-legacy cache needs the number of key/value heads (ModelCache::set_kv_heads)".into(),
            )
        })?,
        _ => 1,
    };
    let batch_dim = |n: usize| -> Vec<usize> {
        let mut d = dims.clone();
        d[0] = n * group;
        d
    };
    if group == 0 || !dims[0].is_multiple_of(group) {
        return Err(Diagnosis::new(
            DiagnosisClass::Batch,
            format!(
                "cannot select batch rows: dimension 0 of the {} {tensor} {dims:?} is not a multiple of {group} key/value heads",
                layout.name()
            ),
        )
        .at(site.layer, site.attention, tensor)
        .shapes(&batch_dim(dims[0] / group.max(1)), &dims)
        .hint("the prefix was built with a head count that is not the model's num_key_value_heads")
        .into());
    }
    let n = dims[0] / group;
    if let Some(bad) = indices.iter().find(|i| **i as usize >= n) {
        return Err(Diagnosis::new(
            DiagnosisClass::Batch,
            format!(
                "beam reorder selects row {bad} but the cache holds {n} rows of {tensor}s {dims:?}"
            ),
        )
        .at(site.layer, site.attention, tensor)
        .shapes(&batch_dim(indices.len()), &dims)
        .hint("the cache was built for a smaller batch than the beams index (the prefix was not expanded to batch x beams)")
        .into());
    }
    let idx = Tensor::new(indices, t.device()).at(site, "reorder indices")?;
    // candle's index_select reads contiguous input only (cached views are narrowed
    // or transposed).
    if group == 1 {
        return t
            .contiguous()
            .and_then(|x| x.index_select(&idx, 0))
            .at(site, "reorder rows");
    }
    // [N*KVH, a, b] -> [N, KVH, a, b] -> [N', KVH, a, b] -> [N'*KVH, a, b]
    let mut view = vec![n, group];
    view.extend_from_slice(&dims[1..]);
    t.reshape(view)
        .and_then(|x| x.contiguous())
        .and_then(|x| x.index_select(&idx, 0))
        .and_then(|x| x.reshape(batch_dim(indices.len())))
        .at(site, "reorder rows")
}

pub(super) fn no_layer(
    layer: usize,
    attention: Attention,
) -> crate::engine::diagnosis::EngineError {
    Diagnosis::new(
        DiagnosisClass::Shape,
        format!("the cache has no {attention}-attention layer {layer}"),
    )
    .hint("the prefix or the model has more layers than the cache was built for")
    .into()
}

/// Check that a preallocated store of `capacity` has room for `s_new` more positions
/// after the `seen` ones (`prefix_len` of them the prefix); `k: [B, KVH, S, D]` are the
/// new keys, whose shape the diagnosis' shapes follow.
pub(super) fn check_capacity(
    capacity: &Capacity,
    layer: usize,
    k: &Tensor,
    seen: usize,
    s_new: usize,
    prefix_len: usize,
) -> Result<()> {
    let (max_len, need) = (capacity.positions, seen + s_new);
    if need <= max_len {
        return Ok(());
    }
    let mut exp = k.dims().to_vec();
    exp[2] = need;
    let mut act = k.dims().to_vec();
    act[2] = max_len;
    Err(Diagnosis::new(
        DiagnosisClass::SeqLen,
        format!(
            "{} holds {max_len} positions but prefix ({prefix_len}) + tokens so far + {s_new} new need {need}",
            capacity.what
        ),
    )
    .at(layer, Attention::SelfAttn, TensorKind::Key)
    .shapes(&exp, &act)
    .hint(capacity.hint)
    .into())
}

/// The absolute position of the first of the `total` keys a window store gives the
/// attention, which end at position `positions` (exclusive); more keys than positions
/// means the prefix's length disagrees with what was seeded (`prefix_len`).
pub(super) fn check_window(
    mode: CacheMode,
    layer: usize,
    positions: usize,
    total: usize,
    prefix_len: usize,
) -> Result<usize> {
    positions.checked_sub(total).ok_or_else(|| {
        Diagnosis::new(
            DiagnosisClass::SeqLen,
            format!(
                "the {} cache holds {total} keys for only {positions} positions (prefix {prefix_len} + tokens)",
                mode.name(),
            ),
        )
        .at(layer, Attention::SelfAttn, TensorKind::Key)
        .shapes(&[positions], &[total])
        .hint("the prefix has more positions than the P it was seeded with")
        .into()
    })
}

/// Check that `new` may be appended to `held` along the layout's sequence dimension,
/// and name the first disagreement.
pub(super) fn check_append(
    layout: Layout,
    layer: usize,
    attention: Attention,
    tensor: TensorKind,
    held: &Tensor,
    new: &Tensor,
    prefix_len: usize,
) -> Result<()> {
    let seq = layout.seq_dim(tensor);
    let (h, n) = (held.dims(), new.dims());
    // What the held tensor should have looked like: the new tensor's shape with the
    // held number of positions.
    let mut expected = n.to_vec();
    if seq < expected.len() {
        expected[seq] = if h.len() == n.len() {
            h[seq]
        } else {
            prefix_len
        };
    }
    let base = |class: DiagnosisClass, msg: String, hint: &str| -> Result<()> {
        Err(Diagnosis::new(class, msg)
            .at(layer, attention, tensor)
            .shapes(&expected, h)
            .hint(hint)
            .into())
    };
    if h.len() != n.len() {
        return base(
            DiagnosisClass::Rank,
            format!(
                "Tensors must have same number of dimensions: got {} and {}; the cache stores {} {} {} but holds a {}-D tensor {:?}",
                h.len(),
                n.len(),
                layout.name(),
                tensor,
                layout.dims_text(tensor),
                h.len(),
                h
            ),
            &rank_hint(layout, h.len()),
        );
    }
    if held.dtype() != new.dtype() {
        return Err(Diagnosis::new(
            DiagnosisClass::Dtype,
            format!(
                "the cache holds {tensor}s of dtype {:?} but the model appends {:?}",
                held.dtype(),
                new.dtype()
            ),
        )
        .at(layer, attention, tensor)
        .shapes(&expected, h)
        .hint(dtype_hint(held.dtype(), new.dtype()))
        .into());
    }
    let roles = layout.roles(tensor);
    for (i, (a, b)) in h.iter().zip(n.iter()).enumerate() {
        if i == seq || a == b {
            continue;
        }
        let class = roles.get(i).copied().unwrap_or(DiagnosisClass::Shape);
        let hint = match class {
            DiagnosisClass::Batch => "the prefix was built for a different batch size (e.g. not expanded to batch x beams, or not reordered with the beams)",
            DiagnosisClass::KvHeads => "the prefix was built with the attention head count instead of the key/value head count (GQA/MQA models need num_key_value_heads)",
            DiagnosisClass::HeadDim => "the prefix head_dim was taken as hidden_size / num_heads while the config sets head_dim (or d_kv) explicitly",
            _ => "the prefix and the model disagree on the cache geometry",
        };
        return base(
            class,
            format!(
                "the cache holds a {tensor} of shape {h:?} and the model appends {n:?}: dimension {i} ({}) differs ({a} vs {b}); layout {} {}",
                class.as_str(),
                layout.name(),
                layout.dims_text(tensor)
            ),
            hint,
        );
    }
    Ok(())
}

fn rank_hint(layout: Layout, held_rank: usize) -> String {
    match (layout, held_rank) {
        (Layout::Standard, 3) => "the prefix was shaped for a legacy 3-D cache layout (Bloom's [batch*heads, head_dim, seq] keys before transformers 4.44, or GPT-BigCode's fused [batch, seq, 2*head_dim]) but the model now uses a 4-D cache (PEFT issue 2192)".into(),
        (Layout::BloomLegacy, 4) | (Layout::BigcodeFused, 4) => "the prefix was shaped as a 4-D [batch, heads, seq, head_dim] tensor but this cache stores the family's legacy 3-D layout".into(),
        _ => format!("the prefix has rank {held_rank}, which does not match the cache layout {}", layout.name()),
    }
}

fn dtype_hint(held: DType, new: DType) -> &'static str {
    let _ = (held, new);
    "the prefix was created in a different dtype than the model (cast the prefix to the model's dtype)"
}
