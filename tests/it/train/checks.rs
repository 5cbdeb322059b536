//! The gradient and base-weight checks: what they catch and how they name it.

use super::*;
use crate::common::assert_contains;

/// A fused softmax (`softmax_last_dim`, no backward) in attention over the prefix: the
/// values still get a gradient, the keys get none. The whole-tensor check cannot see it,
/// the per-block check names layer 0's self-attention key; the differentiable softmax
/// passes both.
#[test]
fn the_gradient_check_catches_a_fused_softmax() {
    let model = tiny_model(Family::Gpt2);
    let prefix = prefix_with(model.as_ref(), 4, false);
    let g = model.geometry();
    let (b, s) = (2, 3);
    let attention_loss = |fused: bool| -> candle_core::Result<Tensor> {
        let pkv = prefix.past_key_values(b).expect("prefix"); // L x [B, H, P, D]
        let mut loss = Tensor::zeros((), DType::F32, &cpu())?;
        for (i, lp) in pkv.iter().enumerate() {
            let n = b * g.num_attention_heads * s * g.head_dim;
            let vals: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i * 3) % 11) as f32 / 11.0 - 0.5)
                .collect();
            // [B, H, S, D]
            let q = Tensor::from_vec(vals, (b, g.num_attention_heads, s, g.head_dim), &cpu())?;
            // [B, H, S, P]
            let scores = q.matmul(&lp.key.t()?)?;
            let probs = if fused {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            };
            // [B, H, S, D]
            let out = probs.matmul(&lp.value)?;
            loss = (loss + (out.sqr()? * 0.5)?.sum_all()?)?;
        }
        Ok(loss)
    };

    let ok = attention_loss(false)
        .and_then(|l| l.backward())
        .expect("backward");
    let check = check_prefix_grads(&ok, &prefix).expect("differentiable softmax passes");
    assert_eq!(check.slices_checked, 4 * 2 * g.num_layers);

    let grads = attention_loss(true)
        .and_then(|l| l.backward())
        .expect("backward succeeds");
    // The whole tensor has a gradient (through the values) ...
    let whole = check_grads(&grads, &prefix.vars()).expect("values carry a gradient");
    assert!(whole[0].grad_norm > 0.0);
    // ... but the keys have none, and the per-block check says where.
    let err = check_prefix_grads(&grads, &prefix).expect_err("fused softmax must be caught");
    let d = no_grad_diagnosis(&err);
    println!("{d}");
    assert_eq!(d.layer, Some(0));
    assert_eq!(d.attention, Some(Attention::SelfAttn));
    assert_eq!(d.tensor, Some(TensorKind::Key));
    assert!(d.message.contains("layer 0 self key"), "{}", d.message);
    assert!(d.hint.contains("fused"), "{}", d.hint);
}

/// A tiny Llama's prefix of 3 virtual tokens (through the projection MLP when
/// `projection`) and its prompt embeddings `[P, L*2*token_dim]`, in the graph.
fn llama_prefix_embeddings(projection: bool) -> (PrefixEncoder, Tensor) {
    let model = tiny_model(Family::Llama);
    let prefix = prefix_with(model.as_ref(), 3, projection);
    let emb = prefix.forward().expect("prompt embeddings");
    (prefix, emb)
}

/// Every path through a fused op: the parameter gets no gradient at all.
#[test]
fn the_gradient_check_catches_a_parameter_without_gradient() {
    // emb: [P, L*2*token_dim]
    let (prefix, emb) = llama_prefix_embeddings(true);
    let w = emb.ones_like().and_then(|o| o.cumsum(1)).expect("weights");
    let grads = candle_nn::ops::softmax_last_dim(&emb)
        .and_then(|p| (p * w)?.sum_all())
        .and_then(|l| l.backward())
        .expect("backward succeeds");
    let err = check_grads(&grads, &prefix.vars()).expect_err("no gradient must be caught");
    let d = no_grad_diagnosis(&err);
    assert!(d.message.contains("`embedding.weight`"), "{}", d.message);
    assert!(d.message.contains("no gradient"), "{}", d.message);
}

/// A gradient with a NaN in it is a `no-grad` diagnosis naming the parameter and the
/// number of non-finite values (here the loss multiplies by `0 * inf` = NaN).
#[test]
fn the_gradient_check_catches_a_non_finite_gradient() {
    // emb: [P, L*2*token_dim]
    let (prefix, emb) = llama_prefix_embeddings(false);
    let nan = emb
        .ones_like()
        .and_then(|o| o.affine(0.0, f64::NAN))
        .expect("NaN weights");
    let grads = (emb * nan)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .expect("backward succeeds");
    let err = check_grads(&grads, &prefix.vars()).expect_err("a NaN gradient must be caught");
    let d = no_grad_diagnosis(&err);
    assert_contains(&d.message, "non-finite gradient values");
}

/// A projection prefix whose first virtual token reaches no loss: the projection MLP is
/// applied row by row, so that token's embedding row gets an exactly zero gradient while
/// the MLP's weights and the other rows get theirs; the per-token check names it.
#[test]
fn the_gradient_check_names_a_projected_virtual_token_without_gradient() {
    // emb: [P, L*2*token_dim]
    let (prefix, emb) = llama_prefix_embeddings(true);
    let grads = emb
        .narrow(0, 1, 2)
        .and_then(|rows| rows.sqr()?.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    check_grads(&grads, &prefix.vars()).expect("every parameter has a gradient somewhere");
    let err = check_prefix_grads(&grads, &prefix).expect_err("token 0 must be caught");
    let d = no_grad_diagnosis(&err);
    assert_contains(&d.message, "virtual token 0 received no usable gradient");
    // Every token reaching the loss passes.
    let grads = emb
        .sqr()
        .and_then(|x| x.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    let check = check_prefix_grads(&grads, &prefix).expect("every token has a gradient");
    assert_eq!(check.slices_checked, 3);
}

/// T5 with the cross-attention prefix dropped: its cross blocks get no gradient, which
/// the check accepts (nothing reads them); the same gradients checked for a prefix
/// that injects the cross part are a `no-grad` diagnosis at a cross block.
#[test]
fn zero_cross_blocks_pass_only_when_the_cross_prefix_is_dropped() {
    use prefix_harness::engine::prefix::CrossPrefix;
    let model = tiny_model(Family::T5);
    let mut prefix = prefix_with(model.as_ref(), 2, false);
    prefix.config.cross = CrossPrefix::Drop;
    let batch = batch_for(model.as_ref(), &data::SENTIMENT[..2], 32, &cpu()).expect("batch");
    let none = CacheConfig::new(CacheMode::None);
    let logits = batch_logits_in(model.as_ref(), &prefix, &batch, &none).expect("logits");
    let grads = masked_cross_entropy(&logits, &batch.labels)
        .expect("loss")
        .backward()
        .expect("backward");
    check_prefix_grads(&grads, &prefix).expect("the dropped cross blocks are not read");
    prefix.config.cross = CrossPrefix::Inject;
    let err = check_prefix_grads(&grads, &prefix).expect_err("unused cross blocks caught");
    let d = no_grad_diagnosis(&err);
    assert_eq!(d.attention, Some(Attention::Cross), "{d}");
}

/// Training through a cache that detaches what it stores (candle-nn's `ConcatKvCache`
/// behind `dynamic`, `KvCache` behind `static`) leaves the prefix without gradient: the
/// check names it. `none`, the training cache, keeps it in the graph.
#[rstest]
fn a_detaching_cache_is_caught(
    #[values(CacheMode::Dynamic, CacheMode::Static { max_len: 128 })] mode: CacheMode,
) {
    let model = tiny_model(Family::Llama);
    let prefix = prefix_with(model.as_ref(), 4, false);
    let batch = batch_for(model.as_ref(), &data::SENTIMENT[..2], 64, &cpu()).expect("batch");
    let loss = |cache: CacheConfig| {
        let logits = batch_logits_in(model.as_ref(), &prefix, &batch, &cache).expect("logits");
        masked_cross_entropy(&logits, &batch.labels).expect("loss")
    };
    let grads = loss(CacheConfig::new(CacheMode::None))
        .backward()
        .expect("backward");
    check_prefix_grads(&grads, &prefix).expect("cache: none keeps the prefix in the graph");
    let grads = loss(CacheConfig::new(mode)).backward().expect("backward");
    let err = check_prefix_grads(&grads, &prefix).expect_err("detached prefix caught");
    let d = no_grad_diagnosis(&err);
    assert!(d.message.contains("`embedding.weight`"), "{}", d.message);
    assert!(d.hint.contains("cache: none"), "{}", d.hint);
}

/// A base weight updated in place (the model built from a `VarMap` whose variables an
/// optimizer could reach) is a no-grad diagnosis naming the weight.
#[test]
fn a_changed_base_weight_is_diagnosed() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
    let cfg = ModelConfig::tiny(Family::Gpt2);
    let (model, base) = BaseWeights::build(&cfg, vb).expect("model builds");
    let before = base.digests().expect("digests");
    assert_eq!(
        check_base_unchanged(&before, &base, "now").expect("unchanged"),
        base.len()
    );
    // Training leaves it alone.
    let prefix = prefix_with(model.as_ref(), 4, false);
    let r = train_checked(
        model.as_ref(),
        &base,
        &prefix,
        &TrainConfig {
            steps: 2,
            ..TrainConfig::default()
        },
    )
    .expect("trains");
    assert_eq!(r.grad_check.base_weights_checked, base.len());
    // An in-place update of one base variable does not go unnoticed.
    let name = base
        .tensors
        .keys()
        .find(|n| n.ends_with("h.1.attn.c_attn.weight"))
        .cloned()
        .expect("a GPT-2 attention weight was recorded");
    let var: Var = varmap
        .data()
        .lock()
        .expect("varmap")
        .get(&name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} in the varmap"));
    let bumped = (var.as_tensor() + 1e-3).expect("bump");
    var.set(&bumped).expect("set");
    let err = check_base_unchanged(&before, &base, "after step 0").expect_err("caught");
    let d = no_grad_diagnosis(&err);
    assert!(d.message.contains(&name), "{}", d.message);
    assert!(d.message.contains("after step 0"), "{}", d.message);
}

/// A NaN in the prefix surfaces as a non-finite diagnosis naming the step (or the
/// evaluation before training, which runs first when enabled).
#[test]
fn a_non_finite_loss_is_diagnosed() {
    let model = tiny_model(Family::Bloom);
    let prefix = prefix_with(model.as_ref(), 2, false);
    let nan = (prefix.embedding.as_tensor().ones_like().expect("ones") * f64::NAN).expect("nan");
    prefix.embedding.set(&nan).expect("set");
    let cfg = TrainConfig {
        evaluate: false,
        ..TrainConfig::default()
    };
    let err = train(model.as_ref(), &prefix, &cfg).expect_err("NaN caught");
    let d = err
        .diagnosis()
        .unwrap_or_else(|| panic!("diagnosis expected: {err}"));
    assert_eq!(d.class, DiagnosisClass::NonFinite, "{d}");
    assert!(d.message.contains("at step 0"), "{}", d.message);
    let err = train(model.as_ref(), &prefix, &TrainConfig::default()).expect_err("NaN caught");
    let d = err
        .diagnosis()
        .unwrap_or_else(|| panic!("diagnosis expected: {err}"));
    assert_eq!(d.class, DiagnosisClass::NonFinite, "{d}");
    assert!(d.message.contains("before training"), "{}", d.message);
}
