//! Qwen2: the Llama decoder ([`super::llama`]) with biases on the q/k/v projections
//! (none on `o_proj`), grouped-query attention and an optional sliding window that only
//! the upper layers use. Parameter names follow `Qwen2ForCausalLM` (the same as
//! Llama's, plus `self_attn.{q,k,v}_proj.bias`).
//!
//! Cache geometry: `[B, num_key_value_heads, S, hidden_size / num_attention_heads]`.
//!
//! Sliding window (transformers 5's `Qwen2Config`): `sliding_window` counts only when
//! `use_sliding_window` is true; then layer `i` slides when `layer_types[i]` is
//! `"sliding_attention"`, or, without `layer_types`, when `i >= max_window_layers`.
//! (transformers 4.x's eager/sdpa attention applied the window to every layer.)

use serde::{Deserialize, Serialize};

use super::llama::{self, Block};
use super::Family;

/// `Qwen2Config` (Hugging Face field names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub core: llama::Core,
    #[serde(flatten)]
    pub sliding: SlidingWindows,
}

impl Config {
    /// Hidden 64, 3 layers, 4 attention heads over one KV head (multi-query),
    /// head_dim 16, vocabulary 256, tied embeddings, `rope_theta` 1e6 (Qwen2's), and a
    /// window of 16 that is off (`use_sliding_window: false`; with it on, layers 1 and 2
    /// slide: `max_window_layers` 1).
    pub fn tiny() -> Self {
        super::tiny_config(include_str!("tiny/qwen2.json"))
    }

    /// The attention window of each layer (see the module docs).
    pub fn windows(&self) -> Vec<Option<usize>> {
        self.sliding.per_layer(self.core.sizes.num_hidden_layers)
    }

    /// The Llama decoder this config describes.
    pub fn decoder(&self) -> (llama::Config, Block) {
        let cfg = llama::Config {
            attention_bias: true,
            ..llama::Config::plain(&self.core)
        };
        let block = Block {
            family: Family::Qwen2,
            o_bias: false,
            windows: self.windows(),
            ..Block::llama(&cfg)
        };
        (cfg, block)
    }
}

/// Qwen2's and Qwen3's sliding-window settings (see the module docs), held flattened
/// by both configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindows {
    pub use_sliding_window: bool,
    /// Absent: 4096; `null`: no window.
    pub sliding_window: Option<usize>,
    pub max_window_layers: usize,
    /// `"full_attention"` | `"sliding_attention"` per layer (transformers 5); `null`:
    /// from `max_window_layers`.
    pub layer_types: Option<Vec<String>>,
}

impl SlidingWindows {
    /// The window of each of `layers` layers: none unless `use_sliding_window`; then
    /// `sliding_window` in the layers whose `layer_types` entry is
    /// `"sliding_attention"`, or, without `layer_types`, in layers `max_window_layers..`.
    pub fn per_layer(&self, layers: usize) -> Vec<Option<usize>> {
        let window = self.sliding_window.filter(|_| self.use_sliding_window);
        (0..layers)
            .map(|i| {
                let slides = match &self.layer_types {
                    Some(types) => types.get(i).map(String::as_str) == Some("sliding_attention"),
                    None => i >= self.max_window_layers,
                };
                window.filter(|_| slides)
            })
            .collect()
    }
}
