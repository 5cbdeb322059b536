//! prefix-harness: a reproducibility and regression harness for prefix tuning.
//!
//! One module per concept: [`model`] (families, weights), [`cache`] (KV cache modes and
//! layouts), [`prefix`] (PEFT prefix encoder and geometry), [`generate`] (prefill and
//! decoding), [`trace`] (the shape trace), [`check`] (diagnoses).

pub mod adapter;
pub mod batching;
pub mod cache;
pub mod check;
pub mod data;
pub mod divergence;
pub mod fingerprint;
pub mod generate;
pub mod hub;
pub mod model;
pub mod prefix;
pub mod report;
pub mod repro;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod stack;
pub mod tokenizer;
pub mod trace;
pub mod train;
