//! Bug reproduction: the Markdown report explains the failure, and shrinking finds a
//! smaller case that fails the same way and still parses as a scenario.

use std::path::Path;

use prefix_harness::harness::report::Environment;
use prefix_harness::harness::repro;
use prefix_harness::harness::run::run_case;
use prefix_harness::harness::scenario;

#[test]
fn the_markdown_report_names_the_diagnosis_shapes_events_and_environment() {
    let file = Path::new("scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml");
    let cases = scenario::load(file).unwrap();
    let results: Vec<_> = cases.iter().map(run_case).collect();
    let text = std::fs::read_to_string(file).unwrap();
    let md = repro::markdown(file, &text, &cases, &results, &Environment::capture(1), &[]);
    for needle in [
        "# prefix-harness reproduction: peft-2192-bloom-legacy-prefix",
        "**Diagnosis:** `rank` at layer 0 self key",
        "- expected shape: `[2, 4, 8, 16]` (rank 4)",
        "- actual shape: `[8, 16, 8]` (rank 3)",
        "PEFT issue 2192",
        "| 0 | 0 | self | Seed | standard | - | [8, 16, 8] |",
        "## Environment",
        "prefix-harness repro scenarios/bugs/peft-2192-bloom-legacy-prefix.yaml",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
}

#[test]
fn shrinking_keeps_the_failure_and_makes_every_knob_minimal() {
    let file = Path::new("scenarios/bugs/mask-not-extended.yaml");
    let case = scenario::load(file).unwrap().remove(0);
    let r = run_case(&case);
    let d = r.diagnosis.clone().expect("the bug reproduces");
    let (small, runs) = repro::shrink(&case, &d);
    assert!(runs > 0);
    let s = &small.scenario;
    assert_eq!(
        (
            s.prefix.virtual_tokens,
            s.data.batch_size,
            s.data.max_prompt_len,
            s.generate.max_new_tokens
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(small.model_config().unwrap().geometry().num_layers, 1);
    let again = run_case(&small).diagnosis.expect("still fails");
    assert_eq!(
        (again.class, again.layer, again.tensor),
        (d.class, d.layer, d.tensor)
    );
}

#[test]
fn a_shrunk_case_written_as_yaml_parses_and_fails_the_same_way() {
    let file = Path::new("scenarios/bugs/peft-pr1901-gqa-attention-heads.yaml");
    let case = scenario::load(file).unwrap().remove(0);
    let d = run_case(&case).diagnosis.unwrap();
    let (small, _) = repro::shrink(&case, &d);
    let yaml = repro::to_yaml(&small).unwrap();
    let back =
        scenario::parse(&file.with_file_name("shrunk.yaml"), &yaml).expect("shrunk YAML parses");
    assert_eq!(back.len(), 1);
    let r = run_case(&back[0]);
    assert_eq!(
        r.status,
        prefix_harness::harness::run::Status::Pass,
        "{:?}",
        r.message
    );
    assert_eq!(r.diagnosis.unwrap().class, d.class);
}
