//! Fuzz target: scenario parsing, validation and matrix expansion on arbitrary UTF-8.
//!
//! Whatever the text, `prefix_harness::scenario::parse` must return `Ok(cases)` or an
//! `InputError`: never panic, hang or exhaust memory. For every case it accepts, the
//! accessors the runner calls before building a model must not panic either, and a
//! case written back as YAML (what `repro --shrink` writes) must parse again.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use prefix_harness::scenario::{self, MAX_CASES_PER_FILE};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A file name that exists nowhere: relative paths in the scenario resolve against
    // a folder that does not exist, so no input can make the target read real files.
    let path = Path::new("fuzz-no-such-dir/scenario.yaml");
    let cases = match scenario::parse(path, text) {
        Ok(cases) => cases,
        Err(e) => {
            // The error must render (Display walks every field).
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        cases.len() <= MAX_CASES_PER_FILE,
        "{} cases from one file",
        cases.len()
    );
    let mut ids = std::collections::HashSet::new();
    for case in &cases {
        assert!(ids.insert(case.id.clone()), "duplicate case id {}", case.id);
        // What `run` computes before the model exists.
        if let Ok(cfg) = case.model_config() {
            let _ = cfg.validate();
            let _ = cfg.geometry();
        }
        let _ = case.prefix_config();
        let _ = case.cache_config(16, case.scenario.prefix.virtual_tokens);
        let _ = case.scenario.expect.describe();
        let _ = case.skip_reason();
        // What `repro --shrink` writes must be a scenario again.
        if let Ok(yaml) = prefix_harness::repro::to_yaml(case) {
            if let Err(e) = scenario::parse(path, &yaml) {
                panic!("a case written back as YAML does not parse: {e}\n---\n{yaml}");
            }
        }
    }
});
