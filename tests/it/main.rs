//! The integration tests, one binary (as ripgrep does): a module per area, the shared
//! helpers in `common`. `cargo test --test it MODULE::` runs one area.

mod common;

mod adapter;
mod bad_inputs;
mod cli;
mod engine_diagnoses;
mod engine_matrix;
mod family_gemma2;
mod family_gemma3;
mod family_gpt_neox;
mod fingerprint;
mod generate;
mod kernels;
mod padding;
mod parity_bigcode;
mod parity_families;
mod parity_llama;
mod parity_phi3;
mod parity_t5;
mod platform_inputs;
mod properties;
mod quantized;
mod real_checkpoints;
mod reference_math;
mod repro;
mod snapshots;
mod stack;
mod tokenizer;
mod train;
mod weights_golden;
