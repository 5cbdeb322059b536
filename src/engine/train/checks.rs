//! The checks a training run makes: every prefix parameter gets a gradient
//! ([`check_prefix_grads`]) and the base model's weights do not change
//! ([`BaseWeights`], [`check_base_unchanged`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::{GradCheck, ParamGrad};
use crate::engine::diagnosis::{
    Attention, CandleExt, Diagnosis, DiagnosisClass, EngineError, Result, TensorKind,
};
use crate::engine::model::{weights, Model, ModelConfig};
use crate::engine::prefix::{PeftGeometry, PrefixEncoder};

fn no_grad(message: String) -> Diagnosis {
    Diagnosis::new(DiagnosisClass::NoGrad, message).hint(
        "the graph between the prefix and the loss was cut: a fused candle op without backward (softmax_last_dim, rms_norm, layer_norm, rope), a cache that detaches what it stores (train with cache: none), or a detach/copy of the prefix",
    )
}

/// L2 norm and number of non-finite values of a tensor.
fn norm_of(t: &Tensor) -> Result<(f64, usize)> {
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .and_then(|g| g.flatten_all())
        .and_then(|g| g.to_vec1())
        .ctx("gradient values")?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    let sq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    Ok((sq.sqrt(), bad))
}

/// Check that every variable in `vars` has a finite, non-zero gradient in `grads`.
/// A variable with no gradient, a non-finite one or an all-zero one is a `no-grad`
/// diagnosis naming it. Works on any `GradStore` and any named variables.
pub fn check_grads(grads: &GradStore, vars: &[(String, Var)]) -> Result<Vec<ParamGrad>> {
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let shape = var.dims().to_vec();
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            no_grad(format!(
                "prefix parameter `{name}` {shape:?} received no gradient"
            ))
        })?;
        let (norm, bad) = norm_of(g)?;
        if bad > 0 {
            return Err(Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!("prefix parameter `{name}` {shape:?} has {bad} non-finite gradient values"),
            )
            .hint("NaN or infinity reached the backward pass: check the loss, the mask (a fully masked row) and the learning rate")
            .into());
        }
        if norm == 0.0 {
            return Err(no_grad(format!(
                "prefix parameter `{name}` {shape:?} received an all-zero gradient"
            ))
            .into());
        }
        out.push(ParamGrad {
            name: name.clone(),
            shape,
            grad_norm: norm,
        });
    }
    Ok(out)
}

/// Where block `j` of a flat prefix (`prompt_embeddings` viewed as `[P, 2L, H*D]`) is
/// used, following PEFT's `get_prompt` (the tensor is concatenated with itself for
/// encoder-decoders, then split per layer into self key, self value[, cross key,
/// cross value]).
pub fn block_uses(g: &PeftGeometry, j: usize) -> Vec<(usize, Attention, TensorKind)> {
    let l2 = 2 * g.num_layers;
    let per = 2 * g.num_transformer_submodules;
    (0..l2 * g.num_transformer_submodules)
        .filter(|c| l2 > 0 && c % l2 == j)
        .map(|c| {
            let i = c % per;
            let att = if i < 2 {
                Attention::SelfAttn
            } else {
                Attention::Cross
            };
            let kind = if i.is_multiple_of(2) {
                TensorKind::Key
            } else {
                TensorKind::Value
            };
            (c / per, att, kind)
        })
        .collect()
}

fn uses_text(uses: &[(usize, Attention, TensorKind)]) -> String {
    uses.iter()
        .map(|(l, a, k)| format!("layer {l} {a} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gradient check of a prefix after one backward pass: [`check_grads`] over every
/// prefix parameter, then every slice of `embedding.weight` on its own: for a flat
/// prefix each (virtual token, layer key/value block), for a projection prefix each
/// virtual token. A slice with an exactly zero or non-finite gradient is a `no-grad`
/// diagnosis naming the layer, self/cross attention and key/value it feeds (a fused
/// softmax in attention, for example, leaves the values with a gradient and the keys
/// with none: the whole-tensor norm alone would not notice).
pub fn check_prefix_grads(grads: &GradStore, prefix: &PrefixEncoder) -> Result<GradCheck> {
    let vars = prefix.vars();
    let params = match check_grads(grads, &vars) {
        Ok(p) => p,
        Err(EngineError::Shape(mut d)) => {
            if d.message.contains("`transform.0.weight`")
                && prefix.transform.is_some()
                && embedding_is_zero(prefix)?
            {
                d.hint = "with `init: zero` and a projection prefix, transform.0.weight gets an exactly zero gradient at the first step (its input, the embedding, is zero); use `init: random`".into();
            }
            return Err(EngineError::Shape(d));
        }
        Err(e) => return Err(e),
    };
    let g = &prefix.geometry;
    let p = g.num_virtual_tokens;
    let grad = grads.get(prefix.embedding.as_tensor()).ok_or_else(|| {
        no_grad("prefix parameter `embedding.weight` received no gradient".into())
    })?;
    let mut slices = 0;
    if prefix.transform.is_none() {
        let blocks = 2 * g.num_layers;
        // [P, 2L]
        let norms: Vec<Vec<f32>> = grad
            .reshape((p, blocks, g.token_dim))
            .and_then(|x| x.sqr())
            .and_then(|x| x.sum(2))
            .and_then(|x| x.to_vec2())
            .ctx("prefix gradient per block [P, 2L]")?;
        for (tok, row) in norms.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                slices += 1;
                if n > 0.0 && n.is_finite() {
                    continue;
                }
                let uses = block_uses(g, j);
                let dropped = prefix.config.cross == crate::engine::prefix::CrossPrefix::Drop;
                if dropped && uses.iter().all(|(_, a, _)| *a == Attention::Cross) {
                    // Only the dropped cross-attention prefix reads this block.
                    continue;
                }
                let what = if n.is_finite() {
                    "an exactly zero"
                } else {
                    "a non-finite"
                };
                let mut d = no_grad(format!(
                    "prefix parameter `embedding.weight`: virtual token {tok}, block {j} of {blocks} ({}) received {what} gradient",
                    uses_text(&uses)
                ));
                if let Some(&(l, a, k)) = uses.first() {
                    d = d.at(l, a, k);
                }
                return Err(d.into());
            }
        }
    } else {
        // [P]
        let norms: Vec<f32> = grad
            .sqr()
            .and_then(|x| x.sum(1))
            .and_then(|x| x.to_vec1())
            .ctx("prefix gradient per virtual token [P]")?;
        for (tok, &n) in norms.iter().enumerate() {
            slices += 1;
            if !(n > 0.0 && n.is_finite()) {
                return Err(no_grad(format!(
                    "prefix parameter `embedding.weight`: virtual token {tok} received no usable gradient (squared norm {n})"
                ))
                .into());
            }
        }
    }
    Ok(GradCheck {
        params,
        slices_checked: slices,
        base_weights_checked: 0,
    })
}

fn embedding_is_zero(prefix: &PrefixEncoder) -> Result<bool> {
    let (n, _) = norm_of(prefix.embedding.as_tensor())?;
    Ok(n == 0.0)
}

// ---------------------------------------------------------------------------------
// Base weights

/// A `VarBuilder` backend that serves another `VarBuilder`'s tensors and keeps a
/// handle on each (the tensor the model was built from).
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    served: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: &Tensor) -> candle_core::Result<()> {
        self.served
            .lock()
            .map_err(|_| candle_core::Error::Msg("weights recorder lock poisoned".into()))?
            .insert(name.to_string(), t.clone());
        Ok(())
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.keep(name, &t)?;
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.keep(name, &t)?;
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The weights of a base model by Hugging Face name, sharing storage with the tensors
/// the model holds.
#[derive(Debug, Clone, Default)]
pub struct BaseWeights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl BaseWeights {
    /// Build `cfg` from `vb` (seeded, safetensors, a `VarMap`, ...) and record every
    /// weight the model asked for.
    pub fn build(cfg: &ModelConfig, vb: VarBuilder) -> Result<(Box<dyn Model>, BaseWeights)> {
        let served: Arc<Mutex<BTreeMap<String, Tensor>>> = Default::default();
        let (dtype, device, path) = (vb.dtype(), vb.device().clone(), vb.prefix());
        let rec = Recorder {
            inner: vb.root(),
            served: served.clone(),
        };
        let mut outer = VarBuilder::from_backend(Box::new(rec), dtype, device);
        if !path.is_empty() {
            outer = outer.pp(path);
        }
        let model = cfg.build(outer)?;
        let tensors = served
            .lock()
            .map_err(|_| EngineError::Config("weights recorder lock poisoned".into()))?
            .clone();
        Ok((model, BaseWeights { tensors }))
    }

    /// [`BaseWeights::build`] over seeded weights (the same weights as
    /// `weights::seeded(seed, F32, device)`).
    pub fn seeded(
        cfg: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> Result<(Box<dyn Model>, BaseWeights)> {
        Self::build(cfg, weights::seeded(seed, DType::F32, device))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Exact-bits digest of every weight.
    pub fn digests(&self) -> Result<BTreeMap<String, u64>> {
        self.tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), weights::digest(t).ctx("digest base weight")?)))
            .collect()
    }
}

/// Compare the base weights with digests taken before training. A changed (or
/// vanished) weight is a `no-grad` diagnosis naming it. Returns the number compared.
pub fn check_base_unchanged(
    before: &BTreeMap<String, u64>,
    base: &BaseWeights,
    when: &str,
) -> Result<usize> {
    for (name, &d0) in before {
        let t = base.tensors.get(name).ok_or_else(|| {
            Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!("base weight `{name}` disappeared {when}"),
            )
        })?;
        let d1 = weights::digest(t).ctx("digest base weight")?;
        if d1 != d0 {
            return Err(Diagnosis::new(
                DiagnosisClass::NoGrad,
                format!(
                    "base weight `{name}` {:?} changed {when} (digest {d0:016x} -> {d1:016x}); only the prefix may train",
                    t.dims()
                ),
            )
            .hint("the optimizer was given base-model variables (e.g. all vars of a VarMap holding the model) or a base weight was updated in place")
            .into());
        }
    }
    Ok(before.len())
}
