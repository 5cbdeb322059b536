//! Unit tests of the kernels' building blocks: the gemm products against candle's
//! matmul, the AVX2 builds of the `with_avx2!` row kernels against their baseline
//! builds (same bits), the lane reductions and the portable `exp`.

use super::attention::{softmax_grad_rows, softmax_rows};
use super::layer::{
    nll_grad_rows, nll_rows, norm_grad_rows, norm_rows, rope_rows, swiglu_grad_values,
    swiglu_values,
};
use super::rows::{dot, exp, row_max, sum_map};
use candle_core::{Device, Layout, Tensor};

/// `dims` of deterministic values in [-1, 1], `seed` shifting the sequence.
fn values(dims: &[usize], seed: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
}

/// [`super::matmul`] (gemm without a zero-filled output, batches in parallel) gives
/// candle's matmul values: batched, with transposed operands (strided rows and
/// columns), a right-hand side shared by every batch (2-D, or broadcast with batch
/// stride 0), and more batches than threads (one single-threaded gemm each) as well
/// as fewer.
#[test]
fn gemm_matmul_matches_candle_matmul_on_batched_transposed_and_shared_operands() {
    let t = values;
    let cases: Vec<(Tensor, Tensor)> = vec![
        (t(&[2, 3, 5, 4], 1.0), t(&[2, 3, 4, 6], 2.0)),
        (t(&[8, 3, 5, 4], 1.0), t(&[8, 3, 4, 6], 2.0)),
        (t(&[2, 3, 5, 4], 1.0), t(&[2, 3, 6, 4], 2.0).t().unwrap()),
        (t(&[9, 4, 5], 1.0).t().unwrap(), t(&[9, 4, 6], 2.0)),
        (t(&[7, 4], 1.0), t(&[4, 3], 2.0)),
        (t(&[2, 5, 4], 1.0), t(&[4, 6], 2.0)),
        (
            t(&[1, 33, 64], 3.0),
            t(&[64, 40], 4.0).t().unwrap().t().unwrap(),
        ),
        (
            t(&[2, 3, 5, 4], 1.0),
            t(&[4, 6], 2.0).broadcast_as((2, 3, 4, 6)).unwrap(),
        ),
    ];
    for (a, b) in &cases {
        let ours = super::matmul(a, b).unwrap();
        let d = max_abs_diff(&ours, &a.broadcast_matmul(b).unwrap());
        assert!(d <= 1e-5, "{:?} @ {:?}: differs by {d}", a.dims(), b.dims());
    }
}

/// [`super::matmul_sum`] (gemm adding each product into the first) gives the sum of
/// candle's products, for contiguous and transposed operands of different inner
/// sizes, and for one term.
#[test]
fn gemm_matmul_sum_matches_the_sum_of_candle_products() {
    let t = values;
    let (a1, b1) = (t(&[37, 16], 1.0), t(&[16, 24], 2.0));
    let (a2, b2) = (t(&[37, 5], 3.0), t(&[24, 5], 4.0).t().unwrap());
    let (a3, b3) = (t(&[9, 37], 5.0).t().unwrap(), t(&[9, 24], 6.0));
    let product = |a: &Tensor, b: &Tensor| a.matmul(b).unwrap();
    let ours = super::matmul_sum(&[(&a1, &b1), (&a2, &b2), (&a3, &b3)]).unwrap();
    let theirs = ((product(&a1, &b1) + product(&a2, &b2)).unwrap() + product(&a3, &b3)).unwrap();
    assert_eq!(ours.dims(), [37, 24]);
    let d = max_abs_diff(&ours, &theirs);
    assert!(d <= 1e-5, "three terms differ by {d}");
    let one = super::matmul_sum(&[(&a1, &b1)]).unwrap();
    let d = max_abs_diff(&one, &product(&a1, &b1));
    assert!(d <= 1e-5, "one term differs by {d}");
}

/// The AVX2 build of each `with_avx2!` kernel gives the same bits as the baseline
/// build (run where the CPU has AVX2; elsewhere only the baseline exists).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_builds_of_the_row_kernels_give_the_same_bits_as_the_baseline() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return;
    }
    let (rows, v) = (6, 37); // a row length with a tail after the 8-wide lanes
    let x: Vec<f32> = (0..rows * v)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
        .collect();
    let targets: Vec<u32> = (0..rows as u32).map(|r| r * 5 % v as u32).collect();
    let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
    nll_rows::baseline(&x, v, &targets, &mut a);
    unsafe { nll_rows::avx2(&x, v, &targets, &mut b) };
    assert_eq!(a, b, "nll_rows");
    let g: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32).collect();
    let (mut da, mut db) = (vec![0f32; rows * v], vec![0f32; rows * v]);
    nll_grad_rows::baseline(&x, v, &targets, &g, &a, &mut da);
    unsafe { nll_grad_rows::avx2(&x, v, &targets, &g, &a, &mut db) };
    assert_eq!(da, db, "nll_grad_rows");
    let mask: Vec<f32> = (0..rows * v)
        .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    let layout = Layout::contiguous((rows, v));
    let (mut sa, mut sb) = (vec![0f32; rows * v], vec![0f32; rows * v]);
    softmax_rows::baseline(&x, v, 0, 0.3, &[(&mask, &layout)], &mut sa);
    unsafe { softmax_rows::avx2(&x, v, 0, 0.3, &[(&mask, &layout)], &mut sb) };
    assert_eq!(sa, sb, "softmax_rows");
    assert!(sa.iter().all(|p| p.is_finite()) && sa.contains(&0.0));
    let (u, dy) = (&sa, &da); // any values of the same length
    let (mut ya, mut yb) = (vec![0f32; rows * v], vec![0f32; rows * v]);
    swiglu_values::baseline(&x, u, &mut ya);
    unsafe { swiglu_values::avx2(&x, u, &mut yb) };
    assert_eq!(ya, yb, "swiglu_values");
    let mut grads: Vec<Vec<f32>> = vec![vec![0f32; rows * v]; 4];
    let [dga, dua, dgb, dub] = &mut grads[..] else {
        unreachable!()
    };
    swiglu_grad_values::baseline(&x, u, dy, dga, dua);
    unsafe { swiglu_grad_values::avx2(&x, u, dy, dgb, dub) };
    assert_eq!((&dga, &dua), (&dgb, &dub), "swiglu_grad_values");
    let same = |name: &str, f: &dyn Fn(&mut [f32]), g: &dyn Fn(&mut [f32])| {
        let (mut a, mut b) = (vec![0f32; rows * v], vec![0f32; rows * v]);
        f(&mut a);
        g(&mut b);
        assert_eq!(a, b, "{name}");
        assert!(a.iter().any(|&x| x != 0.0), "{name} wrote nothing");
    };
    let (w, bias) = (&x[..v], &u[..v]);
    same(
        "softmax_grad_rows",
        &|o| softmax_grad_rows::baseline(u, dy, v, 0.3, o),
        &|o| unsafe { softmax_grad_rows::avx2(u, dy, v, 0.3, o) },
    );
    for centred in [false, true] {
        same(
            "norm_rows",
            &|o| norm_rows::baseline(&x, v, w, bias, 1e-5, centred, o),
            &|o| unsafe { norm_rows::avx2(&x, v, w, bias, 1e-5, centred, o) },
        );
        same(
            "norm_grad_rows",
            &|o| norm_grad_rows::baseline(&x, dy, v, w, 1e-5, centred, o),
            &|o| unsafe { norm_grad_rows::avx2(&x, dy, v, w, 1e-5, centred, o) },
        );
    }
    // RoPE over [B 2, H 3, S 1, D 12]: the tables are [2, 1, 1, 12].
    let (d, tables) = (12, (&u[..24], &dy[..24]));
    let xr = &x[..72];
    for inverse in [false, true] {
        let (mut a, mut b) = (vec![0f32; 72], vec![0f32; 72]);
        rope_rows::baseline(xr, d, (3, 1), 0, tables, inverse, &mut a);
        unsafe { rope_rows::avx2(xr, d, (3, 1), 0, tables, inverse, &mut b) };
        assert_eq!(a, b, "rope_rows");
    }
}

#[test]
fn lane_reductions_cover_every_element_including_the_tail() {
    // Lengths below, at and above the lane count, with and without a tail.
    for n in [0usize, 1, 5, 8, 13, 16, 160, 4099] {
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = (0..n)
            .map(|i| ((i * 11 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
        let dot64: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let tol = 1e-5 * (1.0 + n as f64);
        assert!(
            (f64::from(sum_map(&x, |v| v)) - sum).abs() <= tol,
            "sum of {n}"
        );
        assert!(
            (f64::from(dot(&x, &y)) - dot64).abs() <= tol * 10.0,
            "dot of {n}"
        );
        assert_eq!(row_max(&x), max, "max of {n}");
    }
    // The maximum is found in every lane position and in the tail.
    for at in 0..13 {
        let mut x = vec![0f32; 13];
        x[at] = 1.0;
        assert_eq!(row_max(&x), 1.0, "max at {at}");
    }
}

#[test]
fn portable_exp_is_within_two_ulps_of_libm_and_zero_below_the_normal_range() {
    let mut worst = 0f32;
    let mut x = -87.0f32;
    while x < 88.0 {
        let (ours, libm) = (exp(x), x.exp());
        worst = worst.max(((ours - libm) / libm).abs());
        x += 0.013_7;
    }
    assert!(worst < 2.5e-7, "worst relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-1e9), 0.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert!(exp(f32::NAN).is_nan());
}
