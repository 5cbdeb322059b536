use candle_core::{DType, Device, Tensor};
use prefix_harness::cache::{CacheConfig, CacheMode};
use prefix_harness::generate::{greedy, DecodeOptions};
use prefix_harness::model::{weights, Family, ModelConfig};
use prefix_harness::prefix::{PrefixConfig, PrefixEncoder, PrefixLayout};

#[test]
fn smoke() {
    let dev = Device::Cpu;
    let cfg = ModelConfig::tiny(Family::Gpt2);
    let model = cfg.build(weights::seeded(1, DType::F32, &dev)).unwrap();
    let prefix = PrefixEncoder::new(&PrefixConfig::new(7), &model.geometry(), &dev).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 20, 3], [7, 8, 9, 10, 11], [1, 5, 9, 20, 3]], &dev).unwrap();
    let mut outs = vec![];
    for mode in [CacheMode::None, CacheMode::Dynamic, CacheMode::Static { max_len: 64 }, CacheMode::Sliding { window: 9 }, CacheMode::Legacy] {
        let mut cc = CacheConfig::new(mode);
        if mode == CacheMode::None { cc.window = None; }
        let out = greedy(model.as_ref(), Some(&prefix), &DecodeOptions::new(cc, 6), &ids, None).unwrap();
        println!("{:?} {:?} {:?}", mode, out.tokens, out.cache.stored_key_shape(0));
        outs.push(out);
    }
    for o in &outs[1..4] {
        for (a, b) in outs[0].logits.iter().zip(o.logits.iter()) {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            println!("diff {d}");
        }
    }
    let mut opts = DecodeOptions::new(CacheConfig::new(CacheMode::Dynamic), 3);
    opts.layout = PrefixLayout::BloomLegacy;
    let err = greedy(model.as_ref(), Some(&prefix), &opts, &ids, None).unwrap_err();
    println!("{err}");
    println!("{}", serde_json::to_string_pretty(&outs[1].cache.trace.events[..3]).unwrap());
}
