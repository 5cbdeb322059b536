//! Left padding: a padded row generates exactly what the same prompt generates alone,
//! in every family and cache mode (positions come from the attention mask, as in
//! transformers, so the prefix still ends at P and padding shifts nothing).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use prefix_harness::engine::cache::{CacheConfig, CacheMode};
use prefix_harness::engine::generate::{greedy, DecodeOptions};
use prefix_harness::engine::model::Family;

family_test!(
    CLASSIC,
    a_left_padded_row_generates_what_it_generates_alone,
    |family: Family,
     #[values(CacheMode::None, CacheMode::Dynamic, CacheMode::Legacy)] mode: CacheMode| {
        let model = tiny_model(family);
        let pre = prefix(model.as_ref(), 5);
        // Batch: the long prompt [1, 7], and the short one [1, 4] left-padded by 3.
        let long = prompt(1, 7);
        let short = prompt(1, 4);
        let pad_id = 0u32;
        let padded_short = Tensor::cat(
            &[&Tensor::full(pad_id, (1, 3), &Device::Cpu).unwrap(), &short],
            1,
        )
        .unwrap();
        let ids = Tensor::cat(&[&long, &padded_short], 0).unwrap(); // [2, 7]
        let mask = Tensor::new(&[[1f32; 7], [0., 0., 0., 1., 1., 1., 1.]], &Device::Cpu).unwrap();
        let opts = DecodeOptions::new(CacheConfig::new(mode), 5);
        let batched = greedy(model.as_ref(), Some(&pre), &opts, &ids, Some(&mask)).unwrap();
        let alone = greedy(model.as_ref(), Some(&pre), &opts, &short, None).unwrap();
        assert_eq!(
            batched.tokens[1], alone.tokens[0],
            "{family:?}/{mode:?}: padded row diverges"
        );
        for (step, (a, b)) in batched.logits.iter().zip(&alone.logits).enumerate() {
            let row = a
                .get(1)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let d = max_abs_diff(&row, b);
            assert!(
                d <= 1e-4,
                "{family:?}/{mode:?} step {step}: padded row logits differ by {d}"
            );
        }
    }
);
