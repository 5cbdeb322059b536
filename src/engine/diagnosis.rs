//! Diagnoses: every shape failure in the engine becomes one of these, never a bare
//! panic or an opaque candle error. A diagnosis names the class of failure, where it
//! happened (layer, self/cross attention, key/value/mask), the expected and actual
//! shapes, and the most likely cause.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kind of failure. Names are the ones scenario files use in `expect.error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiagnosisClass {
    /// Tensors of different rank met (e.g. a 3-D legacy prefix and a 4-D cache).
    Rank,
    /// The number of key/value heads differs (e.g. attention heads used for a GQA model).
    KvHeads,
    /// The per-head dimension differs (e.g. hidden/heads instead of the config's head_dim).
    HeadDim,
    /// A sequence length is wrong or does not fit (capacity, cross-attention length).
    SeqLen,
    /// The attention mask's width is not the key length.
    MaskWidth,
    /// The batch dimension differs (e.g. a prefix not expanded for beams).
    Batch,
    /// Element types differ.
    Dtype,
    /// A position is out of range (e.g. past `max_position_embeddings`).
    Position,
    /// A prefix parameter received no (or a non-finite) gradient, or a base weight
    /// changed during training.
    NoGrad,
    /// NaN or infinity in weights, activations or loss.
    NonFinite,
    /// Warning: a sliding cache evicted prefix positions (the run completes, but the
    /// prefix no longer conditions later tokens).
    PrefixEvicted,
    /// A shape failure that fits none of the classes above.
    Shape,
    /// Silent wrong output: the run generated other tokens (or logits) than a
    /// reference that must agree with it (whole prefill for a chunked one, the
    /// uninterrupted run for a saved and restored cache, the row alone for a padded
    /// row); the message names the step, the row and the first differing layer.
    Divergence,
    /// The Python stack raised an exception that is not a shape failure (a `KeyError`
    /// in PEFT's `prepare_inputs_for_generation`, an `AttributeError`, ...): `run
    /// --against peft` only; the engine never gives it.
    Exception,
}

impl DiagnosisClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Rank => "rank",
            Self::KvHeads => "kv-heads",
            Self::HeadDim => "head-dim",
            Self::SeqLen => "seq-len",
            Self::MaskWidth => "mask-width",
            Self::Batch => "batch",
            Self::Dtype => "dtype",
            Self::Position => "position",
            Self::NoGrad => "no-grad",
            Self::NonFinite => "non-finite",
            Self::PrefixEvicted => "prefix-evicted",
            Self::Shape => "shape",
            Self::Divergence => "divergence",
            Self::Exception => "exception",
        }
    }
}

/// Which attention of a layer: decoder self-attention or encoder-decoder cross-attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attention {
    #[serde(rename = "self")]
    SelfAttn,
    Cross,
}

impl fmt::Display for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attention::SelfAttn => "self",
            Attention::Cross => "cross",
        })
    }
}

/// Which tensor of the attention a diagnosis is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TensorKind {
    Key,
    Value,
    Mask,
    Query,
    Positions,
}

impl fmt::Display for TensorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorKind::Key => "key",
            TensorKind::Value => "value",
            TensorKind::Mask => "mask",
            TensorKind::Query => "query",
            TensorKind::Positions => "positions",
        })
    }
}

/// A structured, readable account of a shape failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub class: DiagnosisClass,
    pub layer: Option<usize>,
    pub attention: Option<Attention>,
    pub tensor: Option<TensorKind>,
    /// The shape the consumer required, e.g. `[2, 4, 7, 16]`.
    pub expected_shape: Vec<usize>,
    /// The shape it was given.
    pub actual_shape: Vec<usize>,
    /// One sentence: what was compared and how it differed.
    pub message: String,
    /// One line: the most likely cause and where to look.
    pub hint: String,
}

impl Diagnosis {
    pub fn new(class: DiagnosisClass, message: impl Into<String>) -> Self {
        Self {
            class,
            layer: None,
            attention: None,
            tensor: None,
            expected_shape: vec![],
            actual_shape: vec![],
            message: message.into(),
            hint: String::new(),
        }
    }

    pub fn at(mut self, layer: usize, attention: Attention, tensor: TensorKind) -> Self {
        self.layer = Some(layer);
        self.attention = Some(attention);
        self.tensor = Some(tensor);
        self
    }

    pub fn shapes(mut self, expected: &[usize], actual: &[usize]) -> Self {
        self.expected_shape = expected.to_vec();
        self.actual_shape = actual.to_vec();
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    /// `layer 0 self key`, or as much of it as is known.
    pub fn place(&self) -> String {
        let mut parts = vec![];
        if let Some(l) = self.layer {
            parts.push(format!("layer {l}"));
        }
        if let Some(a) = self.attention {
            parts.push(a.to_string());
        }
        if let Some(t) = self.tensor {
            parts.push(t.to_string());
        }
        if parts.is_empty() {
            "model".to_string()
        } else {
            parts.join(" ")
        }
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {}: {}",
            self.class.as_str(),
            self.place(),
            self.message
        )?;
        if !self.expected_shape.is_empty() || !self.actual_shape.is_empty() {
            write!(
                f,
                " (expected {:?}, rank {}; actual {:?}, rank {})",
                self.expected_shape,
                self.expected_shape.len(),
                self.actual_shape,
                self.actual_shape.len()
            )?;
        }
        if !self.hint.is_empty() {
            write!(f, "; likely cause: {}", self.hint)?;
        }
        Ok(())
    }
}

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A shape failure, diagnosed.
    #[error("{0}")]
    Shape(Box<Diagnosis>),
    /// A configuration that cannot describe a model (zero sizes, heads that do not
    /// divide the hidden size, unknown names).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A candle error that is not about shapes (I/O, missing tensor, ...), with context.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
}

impl EngineError {
    pub fn diagnosis(&self) -> Option<&Diagnosis> {
        match self {
            EngineError::Shape(d) => Some(d),
            _ => None,
        }
    }
}

impl From<Diagnosis> for EngineError {
    fn from(d: Diagnosis) -> Self {
        EngineError::Shape(Box::new(d))
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Where an operation happened, to turn a candle error into a diagnosis.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    pub layer: usize,
    pub attention: Attention,
    pub tensor: TensorKind,
}

impl Site {
    pub fn new(layer: usize, attention: Attention, tensor: TensorKind) -> Self {
        Self {
            layer,
            attention,
            tensor,
        }
    }
}

/// Turn a candle error raised at `site` into a diagnosis when it is about shapes or
/// dtypes, and into `EngineError::Candle` otherwise.
pub fn from_candle(err: candle_core::Error, site: Option<Site>, what: &str) -> EngineError {
    use candle_core::Error as E;
    let inner = unwrap_candle(&err);
    let (class, expected, actual): (DiagnosisClass, Vec<usize>, Vec<usize>) = match inner {
        E::ShapeMismatchCat {
            dim,
            first_shape,
            n,
            nth_shape,
        } => {
            // candle's orientation: the first operand is what the others must match.
            let (a, b) = (first_shape.dims().to_vec(), nth_shape.dims().to_vec());
            let _ = (dim, n);
            (rank_or_shape(&a, &b), a, b)
        }
        E::UnexpectedNumberOfDims {
            expected, shape, ..
        } => (
            DiagnosisClass::Rank,
            vec![0; *expected],
            shape.dims().to_vec(),
        ),
        E::ShapeMismatchBinaryOp { lhs, rhs, .. } => {
            let (a, b) = (lhs.dims().to_vec(), rhs.dims().to_vec());
            (rank_or_shape(&a, &b), b, a)
        }
        E::BroadcastIncompatibleShapes {
            src_shape,
            dst_shape,
        } => (
            DiagnosisClass::Shape,
            dst_shape.dims().to_vec(),
            src_shape.dims().to_vec(),
        ),
        E::DTypeMismatchBinaryOp { .. } | E::UnexpectedDType { .. } => {
            (DiagnosisClass::Dtype, vec![], vec![])
        }
        E::UnexpectedShape { expected, got, .. } => (
            DiagnosisClass::Shape,
            expected.dims().to_vec(),
            got.dims().to_vec(),
        ),
        _ => {
            return EngineError::Candle {
                context: match site {
                    Some(s) => format!("{what} at layer {} {} {}", s.layer, s.attention, s.tensor),
                    None => what.to_string(),
                },
                source: err,
            }
        }
    };
    let mut d = Diagnosis::new(class, format!("{what} failed in candle: {inner}"))
        .shapes(&expected, &actual)
        .hint(
            "a tensor reached a candle operation with a shape the model's attention did not expect",
        );
    if let Some(s) = site {
        d = d.at(s.layer, s.attention, s.tensor);
    }
    d.into()
}

/// Two operands that disagree: `rank` when their ranks differ, else `shape`.
fn rank_or_shape(a: &[usize], b: &[usize]) -> DiagnosisClass {
    if a.len() != b.len() {
        DiagnosisClass::Rank
    } else {
        DiagnosisClass::Shape
    }
}

fn unwrap_candle(err: &candle_core::Error) -> &candle_core::Error {
    use candle_core::Error as E;
    match err {
        E::WithBacktrace { inner, .. } => unwrap_candle(inner),
        E::Context { inner, .. } => unwrap_candle(inner),
        E::WithPath { inner, .. } => unwrap_candle(inner),
        e => e,
    }
}

/// Extension to attach a site to candle results: `t.matmul(&k).at(site, "scores")?`.
pub trait CandleExt<T> {
    fn at(self, site: Site, what: &str) -> Result<T>;
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> CandleExt<T> for candle_core::Result<T> {
    fn at(self, site: Site, what: &str) -> Result<T> {
        self.map_err(|e| from_candle(e, Some(site), what))
    }
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| from_candle(e, None, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint weight of another shape than the model asks for: candle's
    /// `VarBuilder::get` raises `UnexpectedShape`, which becomes a `shape` diagnosis
    /// with both shapes (not a raw candle error).
    #[test]
    fn a_weight_of_another_shape_is_a_shape_diagnosis_with_both_shapes() {
        let dev = candle_core::Device::Cpu;
        let stored = candle_core::Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
        let tensors = std::collections::HashMap::from([("w".to_string(), stored)]);
        let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &dev);
        let err = vb.get((2, 3), "w").unwrap_err();
        let e = from_candle(err, None, "w");
        let d = e
            .diagnosis()
            .unwrap_or_else(|| panic!("not a diagnosis: {e}"));
        assert_eq!(d.class, DiagnosisClass::Shape);
        assert_eq!(
            (&d.expected_shape[..], &d.actual_shape[..]),
            (&[2, 3][..], &[3, 2][..])
        );
    }

    /// The one-line form names the class and place, the message, both shapes when
    /// either is known (an empty one shows as `[]`), and the hint when there is one.
    #[test]
    fn a_diagnosis_reads_as_one_line_with_shapes_only_when_known() {
        let plain = Diagnosis::new(DiagnosisClass::Rank, "got 3 and 4");
        assert_eq!(plain.to_string(), "rank at model: got 3 and 4");
        let placed = plain
            .clone()
            .at(1, Attention::Cross, TensorKind::Value)
            .shapes(&[2, 4, 8, 16], &[8, 16, 8])
            .hint("a legacy prefix");
        assert_eq!(
            placed.to_string(),
            "rank at layer 1 cross value: got 3 and 4 (expected [2, 4, 8, 16], rank 4; actual [8, 16, 8], rank 3); likely cause: a legacy prefix"
        );
        let expected_only = plain.clone().shapes(&[2, 4], &[]);
        assert!(
            expected_only
                .to_string()
                .ends_with("(expected [2, 4], rank 2; actual [], rank 0)"),
            "{expected_only}"
        );
        let actual_only = plain.shapes(&[], &[3]);
        assert!(
            actual_only
                .to_string()
                .ends_with("(expected [], rank 0; actual [3], rank 1)"),
            "{actual_only}"
        );
    }

    fn diagnosis_of(e: candle_core::Error) -> Diagnosis {
        let site = Some(Site::new(2, Attention::SelfAttn, TensorKind::Key));
        match from_candle(e, site, "op") {
            EngineError::Shape(d) => *d,
            other => panic!("expected a diagnosis, got {other}"),
        }
    }

    /// Each kind of candle shape or dtype error becomes a diagnosis with its class, the
    /// place it happened and the expected and actual shapes in that order; other
    /// candle errors stay candle errors with their context.
    #[test]
    fn candle_errors_become_diagnoses_with_expected_and_actual_in_order() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
        // cat of another rank: the rank expected, and the shape given.
        let d = diagnosis_of(Tensor::cat(&[&t(&[2, 4, 3, 8]), &t(&[2, 4, 3])], 2).unwrap_err());
        assert_eq!(
            (d.class, d.expected_shape.len(), d.actual_shape.clone()),
            (DiagnosisClass::Rank, 4, vec![2, 4, 3])
        );
        assert_eq!(d.place(), "layer 2 self key");
        // cat of the same rank: the first operand is what the others must match.
        let d = diagnosis_of(Tensor::cat(&[&t(&[2, 4, 3, 8]), &t(&[2, 2, 3, 8])], 2).unwrap_err());
        assert_eq!(
            (d.class, d.expected_shape.clone(), d.actual_shape.clone()),
            (DiagnosisClass::Shape, vec![2, 4, 3, 8], vec![2, 2, 3, 8])
        );
        // A binary op: the right-hand side is what the left-hand side must match.
        let d = diagnosis_of((t(&[2, 3]) + t(&[2, 4])).unwrap_err());
        assert_eq!(
            (d.class, d.expected_shape.clone(), d.actual_shape.clone()),
            (DiagnosisClass::Shape, vec![2, 4], vec![2, 3])
        );
        let d = diagnosis_of((t(&[2, 3]) + t(&[2, 3, 1])).unwrap_err());
        assert_eq!(d.class, DiagnosisClass::Rank);
        // Broadcasting: the target shape is expected.
        let d = diagnosis_of(t(&[3]).broadcast_as((2, 4)).unwrap_err());
        assert_eq!(
            (d.class, d.expected_shape.clone(), d.actual_shape.clone()),
            (DiagnosisClass::Shape, vec![2, 4], vec![3])
        );
        // dtypes.
        let half = Tensor::zeros((2, 3), DType::F16, &dev).unwrap();
        let d = diagnosis_of((t(&[2, 3]) + half).unwrap_err());
        assert_eq!(d.class, DiagnosisClass::Dtype);
        // Rank of a reshape-free op.
        let d = diagnosis_of(t(&[2, 3]).dims4().unwrap_err());
        assert_eq!(d.class, DiagnosisClass::Rank);
        // Something else stays a candle error with its place in the context.
        let other = candle_core::Error::Msg("disk full".into());
        let site = Some(Site::new(1, Attention::Cross, TensorKind::Value));
        match from_candle(other, site, "write") {
            EngineError::Candle { context, .. } => {
                assert_eq!(context, "write at layer 1 cross value")
            }
            e => panic!("{e}"),
        }
    }
}
