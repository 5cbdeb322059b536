//! The harness around the engine: scenario files and their matrices ([`scenario`]),
//! running and judging cases ([`run`]), reports ([`report`], [`fingerprint`]), bug
//! reports and shrinking ([`repro`]), and the same cases on torch + transformers + PEFT
//! ([`stack`]).

pub mod fingerprint;
pub mod report;
pub mod repro;
pub mod run;
pub mod scenario;
pub mod stack;
