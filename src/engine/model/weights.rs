//! Where model weights come from: seeded (portable, bit-identical everywhere) or a
//! Hugging Face `model.safetensors` file. Both are a candle `VarBuilder`, so model code
//! asks for tensors by their Hugging Face names and never knows which source it reads.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};

use super::nn::Linear;
use crate::engine::diagnosis::{CandleExt, EngineError, Result as DiagResult};
use crate::engine::rng::Rng;

/// A `VarBuilder` backend that invents every requested tensor from `(seed, name)`.
///
/// Values depend only on the seed, the parameter name and its shape, never on the
/// order in which parameters are requested: two models with the same config and seed
/// have identical weights on every platform.
#[derive(Debug, Clone)]
pub struct SeededBackend {
    pub seed: u64,
}

/// Fill `n` values following candle's `Init` hint with the portable generator.
pub fn seeded_values(seed: u64, name: &str, n: usize, fan_in: usize, init: Init) -> Vec<f32> {
    let mut rng = Rng::for_name(seed, name);
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n).map(|_| rng.scaled(mean, stdev) as f32).collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.uniform(lo, up) as f32).collect(),
        Init::Kaiming { .. } => {
            // Kaiming-uniform bound 1/sqrt(fan_in), computed with sqrt only (IEEE exact).
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..n).map(|_| rng.uniform(-bound, bound) as f32).collect()
        }
    }
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let fan_in = dims.last().copied().unwrap_or(1);
        let data = seeded_values(self.seed, name, s.elem_count(), fan_in, h);
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded weights need a shape to invent `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A `VarBuilder` over seeded weights.
pub fn seeded(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededBackend { seed }), dtype, device.clone())
}

/// The initialiser used for weight matrices of the tiny models (GPT-2 style, std 0.02
/// is too small to move tiny logits; 0.1 keeps activations O(1) at hidden 32..128).
pub const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.1,
};

/// Norm scales start at one, biases at a small random value (so that a bias that is
/// loaded into the wrong slot changes the logits and a parity test can notice).
pub const ONES: Init = Init::Const(1.0);
pub const BIAS_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Weight matrix `[out, in]` (or any shape) by its Hugging Face name.
pub fn weight(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
    vb.get_with_hints(shape, name, WEIGHT_INIT)
}

/// Bias vector by name.
pub fn bias(vb: &VarBuilder, size: usize, name: &str) -> candle_core::Result<Tensor> {
    vb.get_with_hints(size, name, BIAS_INIT)
}

/// Norm scale (starts at one) by name.
pub fn ones(vb: &VarBuilder, size: usize, name: &str) -> candle_core::Result<Tensor> {
    vb.get_with_hints(size, name, ONES)
}

/// A 64-bit digest of tensor contents (exact bits), for golden-value tests and
/// fingerprints: equal digests mean bit-identical f32 values.
pub fn digest(t: &Tensor) -> candle_core::Result<u64> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut bytes = Vec::with_capacity(v.len() * 4 + 8 * t.rank());
    for d in t.dims() {
        bytes.extend_from_slice(&(*d as u64).to_le_bytes());
    }
    for x in v {
        bytes.extend_from_slice(&x.to_bits().to_le_bytes());
    }
    Ok(crate::engine::rng::fnv1a(&bytes))
}

/// Every weight (by Hugging Face name) of `cfg` built from `seed`, exactly as the
/// model sees them (recorded by [`crate::engine::train::BaseWeights`]).
pub fn materialize(
    cfg: &super::ModelConfig,
    seed: u64,
    device: &Device,
) -> DiagResult<std::collections::HashMap<String, Tensor>> {
    let (_, base) = crate::engine::train::BaseWeights::seeded(cfg, seed, device)?;
    Ok(base.tensors.into_iter().collect())
}

/// `nn.Linear` parameters by name (weight `[out, in]`, bias `[out]`) as a [`Linear`]
/// `[in, out]` (the weight transposed once here).
pub fn linear_params(vb: &VarBuilder, name: &str, i: usize, o: usize) -> DiagResult<Linear> {
    linear_from(vb, name, (o, i), o, Linear::from_torch)
}

/// GPT-2 `Conv1D` parameters by name (weight `[in, out]`, bias `[out]`) as a
/// [`Linear`] `[in, out]`.
pub fn conv1d_params(vb: &VarBuilder, name: &str, i: usize, o: usize) -> DiagResult<Linear> {
    linear_from(vb, name, (i, o), o, Linear::from_conv1d)
}

/// A PyTorch `nn.Linear` by name, weight `[out, in]` and, when `with_bias`, bias
/// `[out]`, as a [`Linear`] `[in, out]`.
pub fn linear(
    vb: &VarBuilder,
    name: &str,
    i: usize,
    o: usize,
    with_bias: bool,
) -> DiagResult<Linear> {
    if with_bias {
        return linear_params(vb, name, i, o);
    }
    let w = weight(vb, (o, i), &format!("{name}.weight")).ctx(name)?;
    Linear::from_torch(&w, None).ctx(name)
}

/// A fused `nn.Linear` without bias (weight `[sum(outs), in]`) by name, split along its
/// output dimension into `N` `Linear`s `[in, outs[j]]`, in order.
pub fn fused_linears<const N: usize>(
    vb: &VarBuilder,
    name: &str,
    i: usize,
    outs: [usize; N],
) -> DiagResult<[Linear; N]> {
    let total = outs.iter().sum::<usize>();
    // [sum(outs), in]
    let w = weight(vb, (total, i), &format!("{name}.weight")).ctx(name)?;
    let mut start = 0;
    let mut parts = Vec::with_capacity(N);
    for o in outs {
        // [o, in] -> Linear [in, o]
        let part = w
            .narrow(0, start, o)
            .and_then(|p| Linear::from_torch(&p, None))
            .ctx(name)?;
        parts.push(part);
        start += o;
    }
    parts
        .try_into()
        .map_err(|_| EngineError::Config(format!("{name}: split into {N} projections failed")))
}

/// The LM head, `Linear` `[E, V]`: with `tied` (`tie_word_embeddings`), the embedding
/// table `embed: [V, E]` (named `embed_name`) transposed; else the checkpoint's own
/// `{head}.weight` `[V, E]`, read from `root` (the checkpoint's top level: the head sits
/// outside the backbone).
pub fn lm_head(
    root: &VarBuilder,
    head: &str,
    embed: &Tensor,
    embed_name: &str,
    tied: bool,
) -> DiagResult<Linear> {
    if tied {
        return Linear::from_torch(embed, None).ctx(embed_name);
    }
    let w = weight(root, embed.shape().clone(), &format!("{head}.weight")).ctx(head)?;
    Linear::from_torch(&w, None).ctx(head)
}

/// `{name}.weight` of shape `w` and `{name}.bias` `[o]`, made a [`Linear`] by `make`.
fn linear_from(
    vb: &VarBuilder,
    name: &str,
    w: (usize, usize),
    o: usize,
    make: fn(&Tensor, Option<Tensor>) -> candle_core::Result<Linear>,
) -> DiagResult<Linear> {
    let w = weight(vb, w, &format!("{name}.weight")).ctx(name)?;
    let b = bias(vb, o, &format!("{name}.bias")).ctx(name)?;
    make(&w, Some(b)).ctx(name)
}
