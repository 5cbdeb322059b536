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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::super::tests::every_tiny_config;
    use super::super::ModelConfig;

    /// Each family's model reports the family, geometry and per-layer windows its
    /// config gives (the shared decoders: their block's windows; the others: none),
    /// and the tiny models with windows (mistral, gemma2, gemma3) have them.
    #[test]
    fn every_model_reports_its_config() {
        let mut windowed = 0;
        for (family, cfg) in every_tiny_config() {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let model = cfg.build(vb).unwrap_or_else(|e| panic!("{family:?}: {e}"));
            let g = cfg.geometry();
            let windows = match (&cfg, cfg.decoder()) {
                (_, Some((_, block))) => block.windows,
                (ModelConfig::Gemma2(c), _) => c.windows().unwrap(),
                (ModelConfig::Gemma3(c), _) => c.decoder().unwrap().1.windows,
                _ => vec![None; g.num_layers],
            };
            windowed += usize::from(windows.iter().any(Option::is_some));
            assert_eq!(model.family(), family);
            assert_eq!(model.geometry(), g, "{family:?}");
            assert_eq!(model.layer_windows(), windows, "{family:?}");
        }
        assert_eq!(windowed, 3, "tiny models with windows");
    }
}
