//! What a loaded model reports about itself: its family, the geometry that decides
//! every cache shape, and the attention window of each layer ([`Facts`], which each
//! family's model builds once at load and `Model::facts` returns).

use serde::{Deserialize, Serialize};

use super::Family;

/// The numbers that decide every cache shape of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelGeometry {
    /// Layers that carry a KV cache (decoder layers for encoder-decoders).
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    /// Per-head dimension of keys and values (config `head_dim` / `d_kv` when given).
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Largest position the model can embed (learned positions), if bounded.
    pub max_positions: Option<usize>,
    pub encoder_decoder: bool,
}

/// What a model reports about itself, fixed at load from its config (and, for the
/// shared decoders, its block): `Model::family`, `Model::geometry` and
/// `Model::layer_windows` read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub family: Family,
    pub geometry: ModelGeometry,
    /// The attention window of each layer (`None`: global), `geometry.num_layers` of
    /// them.
    pub windows: Vec<Option<usize>>,
}

impl Facts {
    /// A model whose layer `i` attends within `windows[i]` (`None`: globally).
    pub fn windowed(family: Family, geometry: ModelGeometry, windows: Vec<Option<usize>>) -> Self {
        Self {
            family,
            geometry,
            windows,
        }
    }

    /// A model whose layers all attend globally (no windows of their own).
    pub fn global(family: Family, geometry: ModelGeometry) -> Self {
        Self::windowed(family, geometry, vec![None; geometry.num_layers])
    }
}
