//! prefix-harness: a reproducibility and regression harness for prefix tuning.
//!
//! The folders follow the data flow (ARCHITECTURE.md, "The pipeline"):
//! - [`harness`]: scenario files -> cases -> execution -> judge -> reports, and the same
//!   case on the Python stack;
//! - [`engine`]: what a case runs: model families, the prefix, the KV cache, training,
//!   generation, the shape trace and the diagnoses;
//! - [`io`]: what comes from or goes to files: Hugging Face checkpoints, PEFT adapters,
//!   tokenizers, data.

pub mod engine;
pub mod harness;
pub mod io;
