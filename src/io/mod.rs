//! Files in and out: Hugging Face checkpoint folders and the hub ([`hub`]), PEFT
//! adapters ([`adapter`]), tokenizers ([`tokenizer`]) and prompt/training data
//! ([`data`]).

pub mod adapter;
pub mod data;
pub mod hub;
pub mod tokenizer;
