//! The cache invariants, one property each (failing seeds: `cache.proptest-regressions`
//! beside this file).

use super::*;

proptest! {
    #![proptest_config(config())]

    /// After the prefill every layer's self-attention cache holds P + S positions
    /// (sliding: min(P + S, W)) in the layout the cache declares, with its rank, the
    /// model's KV head count and head_dim; the attention read all P + S positions.
    #[test]
    fn prefill_holds_p_plus_s_in_the_declared_layout(st in setup()) {
        let model = st.model();
        let g = model.geometry();
        let (_, trace) = st.run(model.as_ref()).map_err(err)?;
        let (p, b, s) = (st.p, st.b, st.s_dec());
        let layout = st.layout();
        let (kvh, d) = (g.num_kv_heads, g.head_dim);
        for layer in 0..g.num_layers {
            let events = at_step(&trace, 0, layer, Attention::SelfAttn);
            let seed = events.iter().find(|e| e.op == CacheOp::Seed);
            let seed = seed.ok_or_else(|| err(format!("{st:?}: layer {layer}: no seed event")))?;
            prop_assert_eq!(seed.layout, layout, "{:?} layer {}", st, layer);
            prop_assert_eq!(
                seed.shapes.key_written.clone(),
                Some(stored_key_shape(layout, b, kvh, p, d)),
                "{:?} layer {}: prefix keys as seeded", st, layer
            );
            let e = events.iter().find(|e| e.op == CacheOp::Update);
            let e = e.ok_or_else(|| err(format!("{st:?}: layer {layer}: no prefill update")))?;
            prop_assert_eq!(e.layout, layout, "{:?} layer {}", st, layer);
            let held = match (st.mode, model.layer_windows()[layer]) {
                (Mode::Sliding | Mode::Rotating, _) => (p + s).min(st.window),
                (Mode::Hybrid, Some(w)) => (p + s).min(hybrid::keep(w)),
                _ => p + s,
            };
            if st.mode == Mode::None {
                prop_assert_eq!(e.shapes.key_after.clone(), None, "{:?}: recompute stores nothing", st);
            } else {
                let (k, v) = (
                    stored_key_shape(layout, b, kvh, held, d),
                    stored_value_shape(layout, b, kvh, held, d),
                );
                prop_assert_eq!(e.shapes.key_after.clone(), Some(k), "{:?} layer {}: stored keys", st, layer);
                prop_assert_eq!(e.shapes.value_after.clone(), Some(v), "{:?} layer {}: stored values", st, layer);
            }
            let read = vec![b, kvh, p + s, d];
            prop_assert_eq!(e.key_read.clone(), Some(read.clone()), "{:?} layer {}: keys read", st, layer);
            prop_assert_eq!(e.value_read.clone(), Some(read), "{:?} layer {}: values read", st, layer);
        }
    }

    /// At every step the self-attention mask is `[B, 1, S_step, K]` with K the keys read
    /// = cache length before the step + the step's new tokens (and the cross-attention
    /// mask of T5 `[B, 1, S_step, P + E]`).
    #[test]
    fn mask_width_is_cache_length_plus_new_tokens(st in setup()) {
        let model = st.model();
        let g = model.geometry();
        let (_, trace) = st.run(model.as_ref()).map_err(err)?;
        let mut seen = 0;
        let windows = model.layer_windows();
        for e in self_updates(&trace) {
            seen += 1;
            let (a, z) = e.positions.ok_or_else(|| err(format!("{st:?}: no positions")))?;
            let q = z - a;
            let k = keys_at_step(&st, e.step, windows[e.layer]);
            let want_q = if e.step == 0 || st.mode == Mode::None { st.s_dec() + e.step } else { 1 };
            prop_assert_eq!(q, want_q, "{:?} step {} layer {}: new tokens", st, e.step, e.layer);
            prop_assert_eq!(e.mask.clone(), Some(vec![st.b, 1, q, k]), "{:?} step {} layer {}: mask", st, e.step, e.layer);
            prop_assert_eq!(
                e.key_read.as_ref().map(|r| r[2]), Some(k),
                "{:?} step {} layer {}: keys read", st, e.step, e.layer
            );
        }
        prop_assert_eq!(seen, st.new * g.num_layers, "{:?}: one update per layer and step", st);
        for e in trace.events.iter().filter(|e| e.attention == Attention::Cross && e.op != CacheOp::Seed) {
            let q = if e.step == 0 || st.mode == Mode::None { 1 + e.step } else { 1 };
            prop_assert_eq!(e.mask.clone(), Some(vec![st.b, 1, q, st.p + st.s]), "{:?} step {} layer {}: cross mask", st, e.step, e.layer);
        }
    }

    /// The additive mask: query i sees every one of the P prefix columns and its
    /// causal past only (minus left padding, within the window if any); a padding mask
    /// that was not extended by P is a `mask-width` diagnosis.
    #[test]
    fn additive_mask_shows_the_prefix_and_the_causal_past(
        p in 1usize..=16,
        b in 1usize..=3,
        past in 0usize..=8,
        s in 1usize..=6,
        pads in proptest::collection::vec(0usize..=4, 3),
        window in proptest::option::of(1usize..=24),
    ) {
        let t = past + s;
        let total = p + t;
        // Left padding of each row: the first n real columns (at least one token stays).
        let npad: Vec<usize> = pads[..b].iter().map(|n| (*n).min(t - 1)).collect();
        let mut pad = vec![];
        for &n in &npad {
            pad.extend((0..total).map(|c| if c >= p && c < p + n { 0f32 } else { 1f32 }));
        }
        let pad_t = Tensor::from_vec(pad, (b, total), &Device::Cpu).expect("pad");
        let spec = MaskSpec { q_start: p + past, q_len: s, kv_start: 0, kv_len: total, causal: true, window };
        let m = additive_mask(&pad_t, spec, 0, Attention::SelfAttn).map_err(|e| err(e.to_string()))?;
        prop_assert_eq!(m.dims(), &[b, 1, s, total]);
        let m: Vec<f32> = m.flatten_all().and_then(|m| m.to_vec1()).expect("mask values");
        for row in 0..b {
            let n = npad[row];
            for i in 0..s {
                let qp = p + past + i;
                let cells = &m[(row * s + i) * total..(row * s + i + 1) * total];
                let visible: Vec<bool> = cells.iter().map(|x| *x == 0.0).collect();
                prop_assert!(cells.iter().all(|x| *x == 0.0 || *x == f32::NEG_INFINITY), "0 or -inf only");
                let want: Vec<bool> = (0..total)
                    .map(|c| {
                        let real = c < p || c >= p + n;
                        let in_window = window.is_none_or(|w| c + w > qp);
                        real && c <= qp && in_window
                    })
                    .collect();
                // A query that sees nothing (window past every column) sees everything.
                let want = if want.iter().any(|v| *v) { want } else { vec![true; total] };
                prop_assert_eq!(&visible, &want, "row {} query {} (position {})", row, i, qp);
                if window.is_none() {
                    prop_assert!(visible[..p].iter().all(|v| *v), "row {row} query {i}: a prefix column is hidden");
                    // Padding columns at or before this query's position are hidden.
                    let hidden = n.min(qp + 1 - p);
                    prop_assert_eq!(visible.iter().filter(|v| **v).count(), qp + 1 - hidden, "row {} query {}", row, i);
                }
            }
        }
        // Not extended by P: the mask covers past + S positions of P + past + S keys.
        let short = Tensor::ones((b, t), DType::F32, &Device::Cpu).expect("pad");
        let e = additive_mask(&short, spec, 0, Attention::SelfAttn).expect_err("too narrow");
        let d = e.diagnosis().ok_or_else(|| err(format!("not a diagnosis: {e}")))?;
        prop_assert_eq!(d.class, DiagnosisClass::MaskWidth);
    }

    /// Real tokens take positions P.. (the prefix holds 0..P); each decoding step
    /// advances by one (recomputation re-reads P..P+S+t).
    #[test]
    fn positions_start_at_p_and_advance_by_one(st in setup()) {
        let model = st.model();
        let (_, trace) = st.run(model.as_ref()).map_err(err)?;
        let (p, s) = (st.p, st.s_dec());
        for e in trace.events.iter().filter(|e| e.op == CacheOp::Seed) {
            prop_assert_eq!(e.positions, Some((0, p)), "{:?} layer {}: prefix positions", st, e.layer);
        }
        let mut steps = 0;
        for e in self_updates(&trace) {
            let want = match (st.mode, e.step) {
                (_, 0) => (p, p + s),
                (Mode::None, t) => (p, p + s + t),
                (_, t) => (p + s + t - 1, p + s + t),
            };
            prop_assert_eq!(e.positions, Some(want), "{:?} step {} layer {}", st, e.step, e.layer);
            steps = steps.max(e.step + 1);
        }
        prop_assert_eq!(steps, st.new, "{:?}: one forward pass per new token", st);
    }

    /// The key batch is B x rows per input (beams for beam search, return sequences for
    /// sampling) in every event of every step, stored and read; the output has
    /// B x return sequences rows.
    #[test]
    fn key_batch_is_batch_times_beams(
        st in setup(),
        strategy in 0usize..3,
        beams in 1usize..=3,
        ret in 1usize..=3,
    ) {
        let model = st.model();
        let g = model.geometry();
        let (strategy, rows, returned) = match strategy {
            0 => (Decoding::Greedy, 1, 1),
            1 => (Decoding::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 5 }, ret, ret),
            _ => (Decoding::Beam { num_beams: beams, length_penalty: 1.0, early_stopping: false }, beams, ret.min(beams)),
        };
        let mut opts = DecodeOptions::new(st.cache(), st.new).with_strategy(strategy.clone());
        opts.request.num_return_sequences = returned;
        let (out, trace) = st.run_with(model.as_ref(), &opts, &prompt(st.b, st.s));
        let out = out.map_err(err)?;
        let n = st.b * rows;
        let layout = st.layout();
        prop_assert_eq!(out.tokens.len(), st.b * returned, "{:?} {:?}: output rows", st, strategy);
        for e in &trace.events {
            let el = if e.attention == Attention::Cross { Layout::Standard } else { layout };
            for (what, shape) in [("before", &e.shapes.key_before), ("written", &e.shapes.key_written), ("after", &e.shapes.key_after)] {
                if let Some(shape) = shape {
                    prop_assert_eq!(
                        stored_batch(el, shape, g.num_kv_heads), n,
                        "{:?} {:?} step {} layer {} {} {:?}: key {} {:?}",
                        st, strategy, e.step, e.layer, e.attention, e.op, what, shape
                    );
                }
            }
            if let Some(r) = &e.key_read {
                prop_assert_eq!(r[0], n, "{:?} {:?} step {} layer {} {}: keys read", st, strategy, e.step, e.layer, e.attention);
            }
            if let Some(m) = &e.mask {
                prop_assert_eq!(m[0], n, "{:?} {:?} step {} layer {} {}: mask", st, strategy, e.step, e.layer, e.attention);
            }
        }
        for l in &out.logits {
            prop_assert_eq!(l.dims()[0], n, "{:?} {:?}: logits rows", st, strategy);
        }
    }

    /// Identical input rows give identical logits and tokens at every step (the prefix
    /// is the same for every row), and the same as that row generated alone.
    #[test]
    fn identical_rows_give_identical_logits(
        // First, so that shrinking makes the rows copies before it shrinks the batch.
        distinct in proptest::collection::vec(any::<bool>(), 8),
        st in setup(),
    ) {
        let model = st.model();
        // Row r is a distinct row where distinct[r], the base row otherwise (row 0 always
        // base): shrinking makes every row a copy.
        let base = prompt(1, st.s);
        let others = prompt(st.b + 1, st.s);
        let rows: Vec<Tensor> = (0..st.b)
            .map(|r| if r == 0 || !distinct[r] { base.clone() } else { others.get(r + 1).and_then(|t| t.unsqueeze(0)).expect("row") })
            .collect();
        let ids = Tensor::cat(&rows, 0).expect("ids");
        let opts = DecodeOptions::new(st.cache(), st.new);
        let (out, _) = st.run_with(model.as_ref(), &opts, &ids);
        let out = out.map_err(err)?;
        let alone = Setup { b: 1, ..st };
        let (single, _) = alone.run_with(model.as_ref(), &opts, &base);
        let single = single.map_err(err)?;
        for r in (0..st.b).filter(|&r| r == 0 || !distinct[r]) {
            for (step, (l, one)) in out.logits.iter().zip(&single.logits).enumerate() {
                let row = l.get(r).and_then(|x| x.unsqueeze(0)).expect("row logits");
                let first = l.get(0).and_then(|x| x.unsqueeze(0)).expect("row 0 logits");
                let within = max_abs_diff(&row, &first);
                prop_assert!(within <= 1e-5, "{:?} step {}: row {} differs from row 0 by {}", st, step, r, within);
                let vs_alone = max_abs_diff(&row, one);
                prop_assert!(vs_alone <= 1e-4, "{:?} step {}: row {} differs from the row alone by {}", st, step, r, vs_alone);
            }
            prop_assert_eq!(&out.tokens[r], &out.tokens[0], "{:?}: tokens of row {}", st, r);
        }
    }

    /// Every cache mode decodes like recomputation (`none`, same attention window):
    /// logits within 1e-4 and the same tokens (up to a near-tie of the argmax). Each
    /// case checks all four cached modes for its family and sizes (the mode shown in
    /// a minimal failing input is a placeholder; the failure message names the mode).
    #[test]
    fn cached_decoding_equals_recompute(st in setup_in(&Family::ALL, &[Mode::Dynamic])) {
        let model = st.model();
        let model_config = st.model_config();
        let reference = |window: Option<usize>| -> Result<DecodeOutput, TestCaseError> {
            let mut cfg = CacheConfig::new(CacheMode::None);
            cfg.window = window;
            let opts = DecodeOptions::new(cfg, st.new);
            st.run_with(model.as_ref(), &opts, &prompt(st.b, st.s)).0.map_err(err)
        };
        let full = reference(None)?;
        let windowed = reference(Some(st.window))?;
        for mode in [Mode::Dynamic, Mode::Static, Mode::Sliding, Mode::Legacy, Mode::Hybrid] {
            let st = Setup { mode, ..st };
            if st.model_config() != model_config {
                continue; // the fused legacy layout holds multi-query GPT-BigCode only
            }
            let (out, _) = st.run(model.as_ref()).map_err(err)?;
            let reference = if mode == Mode::Sliding { &windowed } else { &full };
            prop_assert_eq!(out.logits.len(), reference.logits.len());
            for (step, (a, r)) in out.logits.iter().zip(&reference.logits).enumerate() {
                let d = max_abs_diff(a, r);
                prop_assert!(d <= 1e-4, "{:?} step {}: logits differ from recompute by {}", st, step, d);
                let differ: Vec<usize> = (0..st.b).filter(|&row| out.tokens[row][step] != reference.tokens[row][step]).collect();
                if differ.is_empty() {
                    continue;
                }
                // Only a near-tie may pick another token; after it the inputs differ.
                for row in differ {
                    let gap = top2_gap(r, row);
                    prop_assert!(gap <= 2e-4, "{:?} step {} row {}: tokens differ without a near-tie (gap {})", st, step, row, gap);
                }
                break;
            }
        }
    }

    /// Settings that must not change what is generated, in every cache mode that keeps
    /// keys: the prompt fed in chunks of C (1..=S) equals the whole prefill (not for
    /// `quantized`, where a chunk reads the earlier chunks quantized); the cache saved
    /// after step K, read back into a fresh cache, equals the uninterrupted run (for
    /// `quantized` its codes, scales and zero points: the same bits); the `rotating`
    /// ring equals the time-ordered `sliding` store of the same window. Logits within
    /// 1e-4, tokens equal up to a near-tie of the argmax.
    #[test]
    fn chunked_prefill_save_load_and_ring_change_nothing(
        st in setup_in(&Family::ALL, &[Mode::Dynamic]),
        chunk in 1usize..=12,
        save_at in 0usize..=3,
    ) {
        let model = st.model();
        let model_config = st.model_config();
        let ids = prompt(st.b, st.s);
        let run = |st: &Setup, f: &dyn Fn(&mut DecodeOptions)| -> Result<DecodeOutput, TestCaseError> {
            let mut opts = DecodeOptions::new(st.cache(), st.new);
            f(&mut opts);
            st.run_with(model.as_ref(), &opts, &ids).0.map_err(err)
        };
        let agree = |what: &str, st: &Setup, out: &DecodeOutput, reference: &DecodeOutput| -> Result<(), TestCaseError> {
            prop_assert_eq!(out.logits.len(), reference.logits.len(), "{:?} {}", st, what);
            for (step, (a, r)) in out.logits.iter().zip(&reference.logits).enumerate() {
                let d = max_abs_diff(a, r);
                prop_assert!(d <= 1e-4, "{:?} {} step {}: logits differ by {}", st, what, step, d);
                let differ: Vec<usize> = (0..out.tokens.len()).filter(|&row| out.tokens[row][step] != reference.tokens[row][step]).collect();
                for row in &differ {
                    let gap = top2_gap(r, *row);
                    prop_assert!(gap <= 2e-4, "{:?} {} step {} row {}: tokens differ without a near-tie (gap {})", st, what, step, row, gap);
                }
                if !differ.is_empty() {
                    break;
                }
            }
            Ok(())
        };
        for mode in [Mode::Dynamic, Mode::Static, Mode::Sliding, Mode::Rotating, Mode::Legacy, Mode::None, Mode::Quantized, Mode::Hybrid] {
            let st = Setup { mode, ..st };
            if st.model_config() != model_config {
                continue; // the fused legacy layout holds multi-query GPT-BigCode only
            }
            let plain = run(&st, &|_| {})?;
            if mode != Mode::None && mode != Mode::Quantized {
                let chunked = run(&st, &|o| o.prefill_chunk = Some(chunk))?;
                agree(&format!("prefill in chunks of {chunk}"), &st, &chunked, &plain)?;
            }
            if save_at + 1 < st.new {
                let restored = run(&st, &|o| o.save_at = Some(save_at))?;
                agree(&format!("saved and restored after step {save_at}"), &st, &restored, &plain)?;
            }
            if mode == Mode::Rotating {
                let sliding = run(&Setup { mode: Mode::Sliding, ..st }, &|_| {})?;
                agree("ring against time order", &st, &plain, &sliding)?;
            }
        }
    }

    /// Continuous batching: rows of different lengths (left-padded to S), each
    /// generated alone up to step K and then merged into one batch, generate what each
    /// row generates alone: logits within 1e-4, tokens equal up to a near-tie.
    #[test]
    fn merged_rows_generate_what_each_row_generates_alone(
        st in setup_in(&DECODER_ONLY, &[Mode::Dynamic]),
        pads in proptest::collection::vec(0usize..=6, 1..=4),
        at in 0usize..=3,
    ) {
        let b = pads.len();
        let st = Setup { b, new: st.new.max(at + 2), ..st };
        let model = st.model();
        let s = st.s + 6;
        let ids = prompt(b, s);
        // [B, S]: row i starts after pads[i] padding positions
        let mask: Vec<f32> = pads.iter().flat_map(|&p| (0..s).map(move |j| if j < p { 0.0 } else { 1.0 })).collect();
        let mask = Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap();
        let prefix = st.prefix(model.as_ref());
        let opts = DecodeOptions::new(st.cache(), st.new);
        let (merged, _) = prefix_harness::engine::batching::generate_merged(model.as_ref(), Some(&prefix), &opts, &ids, &mask, at, false);
        let merged = merged.map_err(|e| err(format!("{st:?}: {e}")))?;
        for (row, &p) in pads.iter().enumerate() {
            let alone_ids = ids.narrow(0, row, 1).and_then(|t| t.narrow(1, p, s - p)).unwrap();
            let (alone, _) = Generation { model: model.as_ref(), prefix: Some(&prefix), opts: &opts, ids: &alone_ids, pad: None }.generate_traced();
            let alone = alone.map_err(|e| err(format!("{st:?}: {e}")))?;
            for step in 0..st.new {
                let a = merged.logits[step].narrow(0, row, 1).unwrap();
                let d = max_abs_diff(&a, &alone.logits[step]);
                prop_assert!(d <= 1e-4, "{:?} pads {:?} merged at {} row {} step {}: logits differ by {}", st, pads, at, row, step, d);
                if merged.tokens[row][step] != alone.tokens[0][step] {
                    let gap = top2_gap(&alone.logits[step], 0);
                    prop_assert!(gap <= 2e-4, "{:?} row {} step {}: tokens differ without a near-tie (gap {})", st, row, step, gap);
                    break;
                }
            }
        }
    }

    /// T5: the cross-attention keys hold P + E positions (E encoder tokens), are
    /// computed once per generation (one update, then reads) in every cache mode but
    /// `none`, which recomputes them every step.
    #[test]
    fn t5_cross_keys_are_prefix_plus_encoder_computed_once(st in setup_in(&[Family::T5], &MODES)) {
        let model = st.model();
        let g = model.geometry();
        let (_, trace) = st.run(model.as_ref()).map_err(err)?;
        let (p, e_len, b, h, d) = (st.p, st.s, st.b, g.num_kv_heads, g.head_dim);
        for layer in 0..g.num_layers {
            let cross: Vec<&TraceEvent> = trace
                .events
                .iter()
                .filter(|e| e.layer == layer && e.attention == Attention::Cross && e.op != CacheOp::Seed)
                .collect();
            prop_assert_eq!(cross.len(), st.new, "{:?} layer {}: one cross event per step", st, layer);
            for (step, e) in cross.iter().enumerate() {
                prop_assert_eq!(e.step, step);
                let want_op = if step == 0 || st.mode == Mode::None { CacheOp::Update } else { CacheOp::Read };
                prop_assert_eq!(e.op, want_op, "{:?} layer {} step {}", st, layer, step);
                prop_assert_eq!(e.key_read.clone(), Some(vec![b, h, p + e_len, d]), "{:?} layer {} step {}: cross keys read", st, layer, step);
                prop_assert_eq!(e.value_read.clone(), Some(vec![b, h, p + e_len, d]), "{:?} layer {} step {}: cross values read", st, layer, step);
                if e.op == CacheOp::Update {
                    prop_assert_eq!(e.shapes.key_before.clone(), Some(vec![b, h, p, d]), "{:?} layer {}: cross prefix", st, layer);
                    prop_assert_eq!(e.shapes.key_written.clone(), Some(vec![b, h, e_len, d]), "{:?} layer {}: encoder keys", st, layer);
                }
            }
        }
    }

    /// One backward pass gives every prefix parameter, and every (virtual token, layer
    /// key/value block) of a flat prefix, a finite non-zero gradient
    /// (`train::check_prefix_grads`), for every family and head geometry.
    #[test]
    fn every_prefix_parameter_gets_a_gradient(
        st in setup(),
        projection in any::<bool>(),
        max_len in 2usize..=20,
    ) {
        let model = st.model();
        let g: ModelGeometry = model.geometry();
        let mut cfg = PrefixConfig::new(st.p);
        cfg.seed = SEED + 1;
        cfg.projection = projection;
        let prefix = PrefixEncoder::new(&cfg, &g, &Device::Cpu).map_err(|e| err(format!("{st:?}: {e}")))?;
        let rows: Vec<(&str, &str)> = (0..st.b).map(|i| data::SENTIMENT[i % data::SENTIMENT.len()]).collect();
        let batch = batch_for(model.as_ref(), &rows, max_len, &Device::Cpu).map_err(|e| err(format!("{st:?}: {e}")))?;
        let loss = batch_loss(model.as_ref(), &prefix, &batch).map_err(|e| err(format!("{st:?}: {e}")))?;
        let grads = loss.backward().map_err(|e| err(format!("{st:?}: backward: {e}")))?;
        let check = check_prefix_grads(&grads, &prefix).map_err(|e| err(format!("{st:?} projection {projection}: {e}")))?;
        prop_assert_eq!(check.params.len(), prefix.vars().len());
        for pg in &check.params {
            prop_assert!(pg.grad_norm.is_finite() && pg.grad_norm > 0.0, "{:?}: {:?}", st, pg);
        }
        let slices = if projection { st.p } else { st.p * 2 * g.num_layers };
        prop_assert_eq!(check.slices_checked, slices, "{:?}", st);
    }
}

/// Gap between the two largest logits of `row` of `[N, V]`.
fn top2_gap(logits: &Tensor, row: usize) -> f32 {
    let mut v: Vec<f32> = logits
        .get(row)
        .and_then(|r| r.to_vec1())
        .expect("logits [N, V]");
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v.get(1).copied().unwrap_or(f32::NEG_INFINITY)
}
