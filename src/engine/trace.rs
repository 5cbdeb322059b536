//! The shape trace: every cache write and read, with the shapes before and after, the
//! mask and the positions. It is plain serde data so that snapshots, reports and
//! fingerprints can all be made from it.

use serde::{Deserialize, Serialize};

use crate::engine::cache::Layout;
use crate::engine::diagnosis::Attention;

/// What happened to a layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheOp {
    /// The prefix was placed into the cache before the first forward pass.
    Seed,
    /// New keys/values were appended (or written at positions) and read back.
    Update,
    /// Stored keys/values were read without a write (T5 cross-attention after step 0).
    Read,
    /// The batch rows of every stored tensor were selected (beam search: the cache
    /// follows the chosen beams; also the expansion of a batch to batch x beams).
    Reorder,
    /// The cache was written to a file (`cache.save_at`).
    Save,
    /// A fresh cache was filled from that file.
    Load,
    /// Per-row caches were merged into one batch (`generate.merge_rows_at`).
    Merge,
}

/// The key/value shapes of one cache event: what the cache held before, what the event
/// wrote and what it held after. The engine's [`TraceEvent`] and the stack driver's
/// event (`harness::stack::StackEvent`) both hold it, flattened into their JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheShapes {
    /// Stored key shape before the event (None when empty).
    pub key_before: Option<Vec<usize>>,
    pub value_before: Option<Vec<usize>>,
    /// The key/value shapes written by this event (new tokens, or the prefix).
    pub key_written: Option<Vec<usize>>,
    pub value_written: Option<Vec<usize>>,
    /// Stored shapes after the event.
    pub key_after: Option<Vec<usize>>,
    pub value_after: Option<Vec<usize>>,
}

/// One cache event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// Forward pass index: 0 is the prefill, 1.. the decoding steps.
    pub step: usize,
    pub layer: usize,
    pub attention: Attention,
    pub op: CacheOp,
    /// The layout the cache stores (serialised as `standard`, `bloom-legacy`,
    /// `bigcode-fused`).
    pub layout: Layout,
    /// The stored and written key/value shapes.
    #[serde(flatten)]
    pub shapes: CacheShapes,
    /// Key/value shapes the attention read, in the standard `[B, H, K, D]` layout.
    pub key_read: Option<Vec<usize>>,
    pub value_read: Option<Vec<usize>>,
    /// The additive attention mask actually applied, `[B, 1, S, K]`.
    pub mask: Option<Vec<usize>>,
    /// Positions of the queries of this step, `start..end` (prefix is `0..P`).
    pub positions: Option<(usize, usize)>,
    /// `rotating` caches: the ring slot the next position goes to, after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_head: Option<usize>,
    /// `hybrid` caches: this layer's store, `sliding/W` (keeps W - 1 positions) or
    /// `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// An ordered list of cache events for one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub events: Vec<TraceEvent>,
    /// The step counter events are stamped with (seeding the prefix is step 0, with
    /// the prefill).
    #[serde(skip)]
    pub step: usize,
    #[serde(skip)]
    started: bool,
}

impl Trace {
    /// Start the next forward pass: the first call keeps step 0.
    pub fn next_step(&mut self) {
        if self.started {
            self.step += 1;
        }
        self.started = true;
    }

    pub fn push(&mut self, mut e: TraceEvent) -> usize {
        e.step = self.step;
        self.events.push(e);
        self.events.len() - 1
    }

    /// The last event of `layer`/`attention` in the current step, to annotate it with
    /// what the attention did after the cache update (mask).
    pub fn last_mut(&mut self, layer: usize, attention: Attention) -> Option<&mut TraceEvent> {
        let step = self.step;
        self.events
            .iter_mut()
            .rev()
            .take_while(|e| e.step == step)
            .find(|e| e.layer == layer && e.attention == attention)
    }

    /// A stable digest of the whole trace (shapes, masks, positions).
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(&self.events).expect("trace serialises");
        format!("{:016x}", crate::engine::rng::fnv1a(json.as_bytes()))
    }
}

/// An empty event for `layer`/`attention`/`op`; fields are filled by the cache.
pub fn event(layer: usize, attention: Attention, op: CacheOp, layout: Layout) -> TraceEvent {
    TraceEvent {
        step: 0,
        layer,
        attention,
        op,
        layout,
        shapes: CacheShapes::default(),
        key_read: None,
        value_read: None,
        mask: None,
        positions: None,
        ring_head: None,
        store: None,
    }
}
