//! The whole `run` path on hostile scenarios.

use super::*;

/// One scenario file from a grab bag of valid and invalid settings (sizes of zero and
/// beyond the limits, unknown names, windows and capacities too small, sampling and
/// beam settings out of range, a vocabulary smaller than the tokenizer's ids, empty
/// prompts, training).
fn hostile_scenario() -> impl Strategy<Value = String> {
    // Mostly valid values, so that most files run; each field has its bad values too.
    fn pick(
        good: &'static [&'static str],
        bad: &'static [&'static str],
    ) -> BoxedStrategy<&'static str> {
        prop_oneof![
            12 => prop::sample::select(good),
            1 => prop::sample::select(bad),
        ]
        .boxed()
    }
    let family = pick(
        &[
            "gpt2",
            "llama",
            "bloom",
            "gpt_bigcode",
            "t5",
            "qwen2",
            "mistral",
            "qwen3",
            "phi3",
            "gpt_neox",
            "gemma2",
        ],
        &["nope"],
    );
    let p = pick(&["1", "3", "8"], &["0", "70000", "-1", "x"]);
    let batch = pick(&["1", "2", "3"], &["0", "9000"]);
    let cache = pick(
        &[
            "{mode: none}",
            "{mode: dynamic}",
            "{mode: static}",
            "{mode: static, max_len: 1}",
            "{mode: sliding, window: 1}",
            "{mode: sliding, window: 5}",
            "{mode: legacy}",
            "{mode: quantized}",
            "{mode: quantized, bits: 4, residual: 1, prefix_full_precision: true}",
        ],
        &[
            "{mode: sliding}",
            "{mode: static, max_len: 0}",
            "{mode: bogus}",
            "{mode: quantized, bits: 3}",
            "{mode: quantized, residual: 0}",
        ],
    );
    let strategy = pick(
        &[
            "greedy",
            "{sample: {temperature: 0.7, top_k: 3, seed: 1}}",
            "{sample: {top_p: 0.0}}",
            "{beam: {num_beams: 2}}",
            "{beam: {num_beams: 2, early_stopping: true, length_penalty: -3}}",
        ],
        &["{sample: {temperature: -1}}", "{beam: {num_beams: 0}}"],
    );
    let new_tokens = pick(&["1", "3"], &["0"]);
    let config = pick(
        &["", "", "  config: {vocab_size: 300}\n"],
        &["  config: {vocab_size: 3}\n", "  config: {nope: 1}\n"],
    );
    let prompts = pick(
        &["", "  prompts: [\"a\", \"bcdefgh\"]\n"],
        &["  prompts: [\"\"]\n"],
    );
    let extra = pick(
        &[
            "",
            "",
            "train: {steps: 1, batch_size: 1, max_len: 8}\n",
            "prefix_extra_projection\n",
            "expect: {error: rank, layer: 7}\n",
        ],
        &["train: {steps: 0}\n"],
    );
    (family, p, batch, cache, strategy, new_tokens, config, prompts, extra).prop_map(
        |(family, p, batch, cache, strategy, new, config, prompts, extra)| {
            let (projection, extra) = if extra == "prefix_extra_projection\n" {
                ("  projection: true\n  encoder_hidden_size: 4\n", "")
            } else {
                ("", extra)
            };
            format!(
                "name: hostile\nmodel:\n  family: {family}\n{config}prefix:\n  virtual_tokens: {p}\n{projection}cache: {cache}\ndata:\n  batch_size: {batch}\n  max_prompt_len: 4\n{prompts}generate:\n  strategy: {strategy}\n  max_new_tokens: {new}\n{extra}"
            )
        },
    )
}

proptest! {
    #![proptest_config(config())]

    /// Any scenario either is refused as input (an error naming the file) or runs to a
    /// status: no panic, no raw candle error with a backtrace, whatever the settings.
    #[test]
    fn any_scenario_is_refused_or_runs_to_a_status_without_a_panic(yaml in hostile_scenario()) {
        use prefix_harness::harness::run::{run_isolated_with, Status};
        use prefix_harness::harness::scenario;
        let file = std::path::Path::new("scenarios/hostile.yaml");
        match scenario::parse(file, &yaml) {
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.starts_with("scenarios/hostile.yaml"), "{text}");
            }
            Ok(cases) => {
                for case in &cases {
                    let r = run_isolated_with(case, Some(std::time::Duration::from_secs(60)), 256 << 20);
                    let m = r.message.clone().unwrap_or_default();
                    prop_assert!(!m.contains("panicked"), "{yaml}\n-> {m}");
                    prop_assert!(!m.contains("stack backtrace") && !m.contains("\n   0: "), "{yaml}\n-> {m}");
                    prop_assert!(matches!(r.status, Status::Pass | Status::Fail | Status::Error | Status::Skip));
                    if r.status == Status::Error {
                        prop_assert!(!m.is_empty(), "{yaml}: an error without a message");
                    }
                }
            }
        }
    }
}

/// A case that panics ends as an `error` result carrying the panic's message and the
/// time it ran; a case over its time limit as an `error` naming the limit, with the
/// caller going on without waiting for it.
#[test]
fn a_panicking_or_hanging_case_is_an_error_result_with_its_time() {
    use prefix_harness::harness::run::{isolate, CaseResult};
    use std::time::{Duration, Instant};
    let case = prefix_harness::harness::scenario::parse(
        std::path::Path::new("p.yaml"),
        "name: p\nmodel:\n  family: gpt2\nprefix:\n  virtual_tokens: 1\n",
    )
    .unwrap()
    .remove(0);
    // `sleep` ms, then panic; `limit`: the time limit; `message`: the result's.
    let check = |limit: Option<u64>, sleep: u64, message: &str| {
        let t0 = Instant::now();
        let r: CaseResult = isolate(&case, limit.map(Duration::from_millis), move |c| {
            std::thread::sleep(Duration::from_millis(sleep));
            panic!("boom at layer 3 of {}", c.id)
        });
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(r.status.as_str(), "error");
        assert_eq!(r.message.as_deref(), Some(message));
        let least = limit.unwrap_or(sleep) as f64;
        assert!(
            (least..=wall).contains(&r.duration_ms),
            "{} ms of {wall}",
            r.duration_ms
        );
        if limit.is_some() {
            // The caller returns at the limit, not when the case ends (a wide margin:
            // a loaded machine can take seconds to report a panic).
            assert!(wall < sleep as f64, "the caller waited {wall} ms");
        }
    };
    check(None, 50, "the case panicked: boom at layer 3 of p");
    check(
        Some(100),
        20_000,
        "time limit: the case did not finish within 0.1 s (--timeout)",
    );
}
