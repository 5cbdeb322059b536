//! T5 (placeholder: being implemented).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{Family, Forward, Model, ModelGeometry};
use crate::check::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
}

impl Config {
    pub fn tiny() -> Self {
        Self { vocab_size: 256, hidden_size: 64, num_layers: 2, num_heads: 4 }
    }
    pub fn geometry(&self) -> ModelGeometry {
        ModelGeometry {
            num_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_kv_heads: self.num_heads,
            head_dim: self.hidden_size / self.num_heads,
            hidden_size: self.hidden_size,
            vocab_size: self.vocab_size,
            max_positions: None,
            encoder_decoder: false,
        }
    }
}

pub struct T5;

impl T5 {
    pub fn load(_cfg: &Config, _vb: VarBuilder) -> Result<Self> {
        Err(EngineError::Config("t5 is not implemented yet".into()))
    }
}

impl Model for T5 {
    fn family(&self) -> Family {
        Family::T5
    }
    fn geometry(&self) -> ModelGeometry {
        unreachable!()
    }
    fn forward(&self, _ids: &Tensor, _fw: &mut Forward) -> Result<Tensor> {
        unreachable!()
    }
}
