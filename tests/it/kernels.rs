//! The fused CPU kernels with their own backward pass (src/engine/model/kernels/) against the
//! composed candle ops they replace: same values and same input gradient, on shapes
//! below and above the size where the kernels switch to parallel rows.

use crate::common::max_abs_diff;

use candle_core::{DType, Device, Tensor, Var, D};
use prefix_harness::engine::model::mlp::GatedMlp;
use prefix_harness::engine::model::{nn, Ops};

const SMALL: (usize, usize, usize, usize) = (2, 3, 5, 7); // 210 elements: serial path
const LARGE: (usize, usize, usize, usize) = (3, 4, 33, 96); // 38016: parallel rows

fn rand(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic values in [-2, 2) without depending on candle's RNG.
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `f(x)` and `d sum(f(x) * r) / dx` for a random `r` (fixed by `seed`).
fn value_and_grad(
    x: &Tensor,
    seed: u64,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> (Tensor, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap();
    let r = rand(y.dims(), seed);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("a gradient for x")
        .clone();
    (y.detach(), g)
}

/// Ours and the reference agree in value and gradient within `tol`, and the gradient
/// is not trivially zero (so the comparison means something).
fn assert_same(
    x: &Tensor,
    tol: f32,
    ours: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) {
    let (y1, g1) = value_and_grad(x, 7, ours);
    let (y2, g2) = value_and_grad(x, 7, reference);
    let (dy, dg) = (max_abs_diff(&y1, &y2), max_abs_diff(&g1, &g2));
    let g_scale = g2.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert!(
        g_scale.to_scalar::<f32>().unwrap() > 1e-3,
        "reference gradient is ~0"
    );
    assert!(dy <= tol, "values differ by {dy}");
    assert!(dg <= tol, "gradients differ by {dg}");
}

fn shape4((a, b, c, d): (usize, usize, usize, usize)) -> [usize; 4] {
    [a, b, c, d]
}

#[test]
fn softmax_matches_composed_softmax_in_value_and_gradient() {
    for dims in [SMALL, LARGE] {
        let x = rand(&shape4(dims), 1);
        assert_same(
            &x,
            1e-6,
            |x| nn::softmax(x, Ops::Kernels),
            |x| candle_nn::ops::softmax(x, D::Minus1),
        );
    }
}

#[test]
fn scaled_masked_softmax_matches_scale_bias_mask_then_softmax() {
    for (b, h, s, k) in [SMALL, LARGE] {
        let scores = rand(&[b, h, s, k], 2);
        // A causal-style additive mask [B, 1, S, K] and a bias [1, H, S, K].
        let mask = rand(&[b, 1, s, k], 3)
            .ge(1.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(-1e9, 0.0)
            .unwrap();
        let bias = rand(&[1, h, s, k], 4);
        let scale = 0.125;
        assert_same(
            &scores,
            1e-5,
            |x| {
                let y = nn::scaled_masked_softmax(x, scale, &[&bias, &mask], Ops::Kernels)?;
                Ok(y.expect("the kernel applies to f32 CPU scores"))
            },
            |x| {
                let z = (x * scale)?.broadcast_add(&bias)?.broadcast_add(&mask)?;
                candle_nn::ops::softmax(&z, D::Minus1)
            },
        );
    }
}

#[test]
fn scaled_masked_softmax_declines_a_mask_that_does_not_fit() {
    let scores = rand(&[2, 3, 5, 7], 5);
    let too_wide = rand(&[2, 1, 5, 8], 6);
    let got = nn::scaled_masked_softmax(&scores, 1.0, &[&too_wide], Ops::Kernels).unwrap();
    assert!(
        got.is_none(),
        "the caller must get candle's own shape error"
    );
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather() {
    for (rows, vocab) in [(6, 11), (40, 1000)] {
        let logits = rand(&[rows, vocab], 8);
        let targets: Vec<u32> = (0..rows as u32)
            .map(|i| (i * 7919) % vocab as u32)
            .collect();
        let t = Tensor::from_vec(targets.clone(), (rows, 1), &Device::Cpu).unwrap();
        assert_same(
            &logits,
            1e-5,
            |x| nn::cross_entropy_rows(x, &targets),
            |x| {
                candle_nn::ops::log_softmax(x, D::Minus1)?
                    .gather(&t, 1)?
                    .squeeze(1)?
                    .neg()
            },
        );
    }
}

#[test]
fn rms_norm_matches_composed_rms_norm() {
    for dims in [SMALL, LARGE] {
        let x = rand(&shape4(dims), 9);
        let w = rand(&[dims.3], 10);
        assert_same(
            &x,
            1e-5,
            |x| nn::rms_norm(x, &w, 1e-6, Ops::Kernels),
            |x| candle_nn::ops::rms_norm_slow(x, &w, 1e-6),
        );
    }
}

#[test]
fn layer_norm_matches_composed_layer_norm() {
    for dims in [SMALL, LARGE] {
        let x = rand(&shape4(dims), 11);
        let (w, b) = (rand(&[dims.3], 12), rand(&[dims.3], 13));
        assert_same(
            &x,
            1e-5,
            |x| nn::layer_norm(x, &w, &b, 1e-5, Ops::Kernels),
            |x| candle_nn::ops::layer_norm_slow(x, &w, &b, 1e-5),
        );
    }
}

#[test]
fn rope_matches_rotate_half_formula_on_a_transposed_input() {
    for (b, h, s, d) in [(2, 3, 5, 8), (3, 4, 33, 96)] {
        // A [B, S, H, D] tensor seen as [B, H, S, D], as split_heads makes it.
        let x = rand(&[b, s, h, d], 14);
        let (cos, sin) = (rand(&[b, 1, s, d], 15), rand(&[b, 1, s, d], 16));
        assert_same(
            &x,
            1e-5,
            |x| nn::rope(&x.transpose(1, 2)?, &cos, &sin),
            |x| {
                let x = x.transpose(1, 2)?;
                let (x1, x2) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
                let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
                x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
            },
        );
    }
}

#[test]
fn frozen_linear_matches_broadcast_matmul_and_gives_no_weight_gradient() {
    for (b, s, i, o) in [(2, 3, 5, 7), (3, 33, 96, 40)] {
        let x = rand(&[b, s, i], 17);
        let w = rand(&[o, i], 18); // PyTorch nn.Linear [out, in]
        let bias = rand(&[o], 19);
        let lin = nn::Linear::from_torch(&w, Some(bias.clone())).unwrap();
        assert_same(
            &x,
            1e-4,
            |x| lin.forward(x),
            |x| x.broadcast_matmul(&w.t()?)?.broadcast_add(&bias),
        );
        // The weight, even as a Var, gets no gradient through the frozen op.
        let wv = Var::from_tensor(&w).unwrap();
        let lin = nn::Linear::from_torch(wv.as_tensor(), None).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let grads = lin
            .forward(xv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(xv.as_tensor()).is_some());
        assert!(grads.get(wv.as_tensor()).is_none());
    }
}

#[test]
fn swiglu_matches_silu_times_up_for_both_inputs() {
    for dims in [SMALL, LARGE] {
        let gate = rand(&shape4(dims), 20);
        let up = rand(&shape4(dims), 21);
        // Gradient with respect to the gate, then to the up projection.
        assert_same(&gate, 1e-5, |g| nn::swiglu(g, &up), |g| g.silu()? * &up);
        assert_same(&up, 1e-5, |u| nn::swiglu(&gate, u), |u| gate.silu()? * u);
    }
}

#[test]
fn split_and_merge_heads_match_reshape_and_transpose() {
    use prefix_harness::engine::model::attention::{merge_heads, split_heads};
    for (b, s, h, d) in [(2, 3, 4, 5), (3, 33, 8, 64)] {
        let x = rand(&[b, s, h * d], 22);
        assert_same(
            &x,
            0.0,
            |x| split_heads(x, h, d),
            |x| x.reshape((b, s, h, d))?.transpose(1, 2),
        );
        let y = rand(&[b, h, s, d], 23);
        assert_same(&y, 0.0, merge_heads, |y| {
            y.transpose(1, 2)?.reshape((b, s, h * d))
        });
    }
}

#[test]
fn swiglu_mlp_block_matches_the_composed_llama_mlp_with_residual() {
    // Serial and parallel rows; E -> I -> E as in Llama's MLP.
    for (b, s, e, i) in [(2, 3, 5, 7), (3, 33, 64, 96)] {
        let x = rand(&[b, s, e], 24);
        let norm_w = rand(&[e], 25);
        // Weights scaled by 1/sqrt(fan_in), as initialised models are, so that values
        // and gradients stay O(1) and an absolute tolerance means something.
        let w = |shape: [usize; 2], seed| (rand(&shape, seed) / (shape[1] as f64).sqrt()).unwrap();
        let (wg, wu, wd) = (w([i, e], 26), w([i, e], 27), w([e, i], 28));
        let lin = |w: &Tensor| nn::Linear::from_torch(w, None).unwrap();
        let mlp = GatedMlp {
            gate_proj: lin(&wg),
            up_proj: lin(&wu),
            down_proj: lin(&wd),
        };
        assert_same(
            &x,
            1e-4,
            |x| mlp.swiglu_residual(x, (&norm_w, 1e-6), Ops::Kernels),
            |x| {
                let n = candle_nn::ops::rms_norm_slow(x, &norm_w, 1e-6)?;
                let g = n.broadcast_matmul(&wg.t()?)?;
                let u = n.broadcast_matmul(&wu.t()?)?;
                x + (g.silu()? * u)?.broadcast_matmul(&wd.t()?)?
            },
        );
    }
}

#[test]
fn the_llama_mlp_is_one_graph_node_only_when_training_with_the_crates_kernels() {
    // Training (a tracked f32 CPU input) in `Ops::Kernels` runs the block op
    // (`kernels::SwiGluMlp`): the graph is the output and `x`. `Ops::Composed` composes
    // it from single ops (norm, gate, up, SwiGLU, down, residual: a node each).
    // (`Ops::Fused`'s graph is also two nodes: its fused norm cuts the branch off.)
    let (b, s, e, i) = (2, 3, 5, 7);
    let x = Var::from_tensor(&rand(&[b, s, e], 24)).unwrap();
    let norm_w = rand(&[e], 25);
    let lin = |shape: [usize; 2], seed| nn::Linear::from_torch(&rand(&shape, seed), None).unwrap();
    let mlp = GatedMlp {
        gate_proj: lin([i, e], 26),
        up_proj: lin([i, e], 27),
        down_proj: lin([e, i], 28),
    };
    let run = |ops| {
        mlp.swiglu_residual(x.as_tensor(), (&norm_w, 1e-6), ops)
            .unwrap()
    };
    let block = run(Ops::Kernels);
    assert_eq!(block.sorted_nodes().len(), 2, "the block op and x");
    let composed = run(Ops::Composed);
    let nodes = composed.sorted_nodes().len();
    assert!(nodes > 2, "{nodes} nodes, expected the composed ops");
    for other in [composed, run(Ops::Fused)] {
        let diff = max_abs_diff(&block, &other);
        assert!(diff < 1e-4, "the values differ by {diff}");
    }
}

/// `y = f(q, k, v)` and the gradients of `sum(y * r)` for q, k and v.
fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = [q, k, v]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let r = rand(y.dims(), 33);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    (y.detach(), g)
}

#[test]
fn attention_core_matches_composed_grouped_attention_for_queries_keys_and_values() {
    use prefix_harness::engine::diagnosis::Attention;
    use prefix_harness::engine::model::attention::{repeat_kv, sdpa, Scores};
    // (B, H, KVH, S, K, D): serial and parallel softmax rows; K - S prefix columns.
    for (b, h, kvh, s, kl, d) in [(2, 4, 2, 3, 5, 8), (2, 8, 2, 33, 40, 16)] {
        let (q, k, v) = (
            rand(&[b, h, s, d], 30),
            rand(&[b, kvh, kl, d], 31),
            rand(&[b, kvh, kl, d], 32),
        );
        // Causal over the S new positions, the K - S prefix columns always visible.
        let mask: Vec<f32> = (0..b * s * kl)
            .map(|i| match (i % kl) > (i / kl) % s + (kl - s) {
                true => f32::NEG_INFINITY,
                false => 0.0,
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, s, kl), &Device::Cpu).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let (y1, g1) = attention_grads(&q, &k, &v, |q, k, v| {
            sdpa(
                q,
                k,
                v,
                &Scores::new(&mask, scale, 0, Attention::SelfAttn, Ops::Kernels),
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
        });
        let (y2, g2) = attention_grads(&q, &k, &v, |q, k, v| {
            let (k, v) = (repeat_kv(k, h / kvh)?, repeat_kv(v, h / kvh)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)
        });
        assert!(
            max_abs_diff(&y1, &y2) <= 1e-5,
            "values differ by {}",
            max_abs_diff(&y1, &y2)
        );
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(g1.iter().zip(&g2)) {
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(
                scale.to_scalar::<f32>().unwrap() > 1e-3,
                "reference d{name} is ~0"
            );
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-5, "d{name} differs by {diff}");
        }
    }
}

/// The fused-ops mode (candle-nn's softmax and norms, the attention scores scaled and
/// masked by composed ops instead of the crate's one softmax kernel) gives the same
/// logits as the default kernels, for every family, with a prefix: the composed path
/// is the one `train.fused_ops` and non-f32 runs take. (Decoder-only families: the
/// helper feeds no decoder ids.)
#[test]
fn fused_ops_mode_gives_the_default_logits_in_every_family() {
    use crate::common::{logits_with, prefix, prompt, tiny_model};
    use prefix_harness::engine::cache::{CacheConfig, CacheMode};
    use prefix_harness::engine::generate::forward_logits;
    use prefix_harness::engine::model::Family;
    for family in Family::ALL {
        let model = tiny_model(family);
        if model.geometry().encoder_decoder {
            continue;
        }
        let p = prefix(model.as_ref(), 3);
        let ids = prompt(2, 5); // [B, S]
        let own = logits_with(model.as_ref(), Some(&p), CacheMode::Dynamic, &ids); // [B, S, V]
        let dynamic = CacheConfig::new(CacheMode::Dynamic);
        let (fused, _) = forward_logits(model.as_ref(), Some(&p), &dynamic, Ops::Fused, &ids, None)
            .expect("forward");
        let d = max_abs_diff(&own, &fused);
        assert!(d < 1e-4, "{}: fused ops differ by {d}", family.name());
    }
}

/// `forward_logits` runs its pass in the ops mode it is given: with `Ops::Fused` the
/// gradient stops at candle-nn's fused softmax and norms, so the prefix gets none
/// (or the backward pass refuses); with the default kernels it gets one.
#[test]
fn forward_logits_runs_the_ops_mode_it_is_given() {
    use crate::common::{prefix, prompt, tiny_model};
    use prefix_harness::engine::cache::{CacheConfig, CacheMode};
    use prefix_harness::engine::generate::forward_logits;
    use prefix_harness::engine::model::Family;
    let model = tiny_model(Family::Llama);
    let p = prefix(model.as_ref(), 3);
    let ids = prompt(2, 5); // [B, S]
                            // `none` keeps the prefix in the graph (the other cache modes detach what they hold).
    let none = CacheConfig::new(CacheMode::None);
    // The squared norm of the prefix's gradient from the sum of the logits [B, S, V].
    let prefix_grad = |ops| -> f32 {
        let (logits, _) =
            forward_logits(model.as_ref(), Some(&p), &none, ops, &ids, None).expect("forward");
        let Ok(grads) = logits.sum_all().and_then(|l| l.backward()) else {
            return 0.0;
        };
        grads.get(p.embedding.as_tensor()).map_or(0.0, |g| {
            g.sqr()
                .and_then(|g| g.sum_all())
                .and_then(|n| n.to_scalar())
                .expect("norm")
        })
    };
    assert!(
        prefix_grad(Ops::Kernels) > 0.0,
        "the kernels pass the gradient on"
    );
    assert_eq!(prefix_grad(Ops::Fused), 0.0, "the fused ops stop it");
}

/// Splitting `[B, S, H*D]` into heads that do not divide it is an error, from the
/// crate's kernel path (f32 on the CPU) as from the composed one, not a silent reshape.
#[test]
fn split_heads_refuses_a_width_that_is_not_heads_times_head_dim() {
    use prefix_harness::engine::model::attention::split_heads;
    let x = rand(&[1, 2, 10], 3); // [B, S, 10]
    assert!(
        split_heads(&x, 4, 3).is_err(),
        "10 columns are not 4 heads of 3"
    );
    assert!(
        split_heads(&x, 2, 4).is_err(),
        "10 columns are not 2 heads of 4"
    );
    assert_eq!(split_heads(&x, 2, 5).unwrap().dims(), &[1, 2, 2, 5]);
}
