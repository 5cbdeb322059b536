//! What a case runs: a model family ([`model`]) with a PEFT prefix ([`prefix`]) over a
//! KV cache ([`cache`]), trained ([`train`]) and decoded ([`generate`], [`batching`]);
//! every cache event is recorded ([`trace`]); shape failures become [`diagnosis`]
//! classes and silent wrong outputs [`divergence`]s.

pub mod batching;
pub mod cache;
pub mod diagnosis;
pub mod divergence;
pub mod generate;
pub mod model;
pub mod prefix;
pub mod rng;
pub mod trace;
pub mod train;
