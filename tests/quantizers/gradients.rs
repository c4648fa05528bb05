//! Gradient tests: straight-through gradients against central finite differences
//! of the unrounded quantizer (rounding treated as identity), in float64.

use crate::common;

use common::{assert_close, assert_exact, values};
use tch::{nn, Device, Kind, Tensor};
use torchapprox::quantizers::{
    minmax_quant, pact_quant, ApproxQuantizer, MinMaxQuant, PACTQuant, QuantConfig, ALPHA_MIN,
};

const H: f64 = 1e-6;

/// Inputs spread over [-3, 3] that stay at least 0.05 away from ±`alpha`,
/// so a finite-difference step never crosses the clipping edge.
fn inputs_away_from(alpha: f64, n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let x = Tensor::rand([n], (Kind::Double, Device::Cpu)) * 6.0 - 3.0;
    let near = (x.abs() - alpha).abs().lt(0.05);
    x.where_scalarother(&near.logical_not(), 0.5)
}

fn pact64(bits: u32, alpha: f64, rounded: bool) -> (nn::VarStore, PACTQuant) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let q = PACTQuant::from_config(
        vs.root(),
        QuantConfig { bitwidth: bits, init_alpha: alpha, rounded, ..Default::default() },
    )
    .unwrap();
    vs.double();
    (vs, q)
}

/// Weighted sum of the fake-quantized output, the scalar whose gradient is checked.
fn objective(q: &dyn ApproxQuantizer, x: &Tensor, w: &Tensor) -> Tensor {
    (q.f_fake_quantize(x).unwrap() * w).sum(Kind::Double)
}

#[test]
fn pact_gradients_match_finite_differences() {
    for bits in [2, 4, 8, 16] {
        let alpha = 1.7;
        let x = inputs_away_from(alpha, 24, bits as i64);
        let w = Tensor::randn([24], (Kind::Double, Device::Cpu));
        // Autograd through the real (rounded) quantizer.
        let (_vs, q) = pact64(bits, alpha, true);
        let xg = x.detach().set_requires_grad(true);
        objective(&q, &xg, &w).backward();
        let (gx, ga) = (xg.grad(), q.alpha().grad());
        // Finite differences of the same quantizer without rounding.
        let (_vs2, smooth) = pact64(bits, alpha, false);
        let mut fd_x = vec![0.0; 24];
        for (i, slot) in fd_x.iter_mut().enumerate() {
            let e =
                Tensor::zeros([24], (Kind::Double, Device::Cpu)).index_fill(0, &Tensor::from(i as i64), H);
            let up = objective(&smooth, &(&x + &e), &w).double_value(&[]);
            let down = objective(&smooth, &(&x - &e), &w).double_value(&[]);
            *slot = (up - down) / (2.0 * H);
        }
        assert_close(&gx, &Tensor::from_slice(&fd_x), 1e-6, 1e-6, &format!("PACT d/dx, {bits} bits"));
        let at = |a: f64| {
            tch::no_grad(|| smooth.alpha().shallow_clone().copy_(&Tensor::from_slice(&[a])));
            objective(&smooth, &x, &w).double_value(&[])
        };
        let fd_a = (at(alpha + H) - at(alpha - H)) / (2.0 * H);
        assert_close(&ga, &Tensor::from_slice(&[fd_a]), 1e-6, 1e-6, &format!("PACT d/dalpha, {bits} bits"));
        assert!(fd_a.abs() > 0.1, "the check must involve clipped elements, got d/dalpha = {fd_a}");
    }
}

#[test]
fn minmax_gradient_matches_finite_differences_and_is_grad_times_scale() {
    for bits in [2, 4, 8, 16] {
        let x = inputs_away_from(10.0, 16, 100 + bits as i64);
        let w = Tensor::randn([16], (Kind::Double, Device::Cpu));
        let q = MinMaxQuant::new(common::scratch().root() / "minmax", bits);
        let xg = x.detach().set_requires_grad(true);
        objective(&q, &xg, &w).backward();
        let smooth = MinMaxQuant::from_config(
            common::scratch().root() / "minmax",
            QuantConfig { bitwidth: bits, rounded: false, ..Default::default() },
        )
        .unwrap();
        let fd: Vec<f64> = (0..16)
            .map(|i| {
                let e = Tensor::zeros([16], (Kind::Double, Device::Cpu)).index_fill(
                    0,
                    &Tensor::from(i as i64),
                    H,
                );
                let up = objective(&smooth, &(&x + &e), &w).double_value(&[]);
                let down = objective(&smooth, &(&x - &e), &w).double_value(&[]);
                (up - down) / (2.0 * H)
            })
            .collect();
        assert_close(&xg.grad(), &Tensor::from_slice(&fd), 1e-6, 1e-6, &format!("MinMax d/dx, {bits} bits"));

        // The integer output's gradient is exactly grad * scale, as in TorchApprox.
        let xg = x.detach().set_requires_grad(true);
        let g = Tensor::randn([16], (Kind::Double, Device::Cpu));
        (q.quantize(&xg) * &g).sum(Kind::Double).backward();
        assert_exact(&xg.grad(), &(&g * q.scale_factor()), &format!("MinMax integer gradient, {bits} bits"));

        let xg = x.detach().set_requires_grad(true);
        let s = 127.0 / 2.5;
        (minmax_quant(&xg, 2.5, 127) * &g).sum(Kind::Double).backward();
        assert_exact(&xg.grad(), &(&g * s), "minmax_quant node gradient");
    }
}

#[test]
fn element_exactly_at_alpha_counts_as_clipped() {
    let vs = nn::VarStore::new(Device::Cpu);
    let q = PACTQuant::from_config(vs.root(), QuantConfig { init_alpha: 2.0, ..Default::default() }).unwrap();
    let x = Tensor::from_slice(&[2.0f32, -2.0, 1.999, -1.999, 0.0, 5.0]).set_requires_grad(true);
    q.forward_sum(&x).backward();
    assert_eq!(values(&x.grad()), [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
    // +1 (at 2.0) - 1 (at -2.0) + 1 (at 5.0).
    assert_eq!(values(&q.alpha().grad()), [1.0]);
}

trait ForwardSum {
    fn forward_sum(&self, x: &Tensor) -> Tensor;
}
impl<Q: ApproxQuantizer> ForwardSum for Q {
    fn forward_sum(&self, x: &Tensor) -> Tensor {
        self.f_fake_quantize(x).unwrap().sum(Kind::Float)
    }
}

#[test]
fn pact_quant_node_gradients_are_scaled_by_int_max_over_alpha() {
    let alpha = Tensor::from_slice(&[2.0f32]).set_requires_grad(true);
    let x = Tensor::from_slice(&[-3.0f32, -1.0, 0.5, 2.5]).set_requires_grad(true);
    pact_quant(&x, &alpha, 7).sum(Kind::Float).backward();
    let s = 7.0 / 2.0;
    assert_eq!(values(&x.grad()), [0.0, s, s, 0.0]);
    assert_eq!(values(&alpha.grad()), [0.0]); // -s + s
}

#[test]
fn nan_inputs_never_poison_alpha_or_its_gradient() {
    let vs = nn::VarStore::new(Device::Cpu);
    let q = PACTQuant::new(vs.root(), 8);
    let x = Tensor::from_slice(&[f32::NAN, 1.0, 3.0, f32::INFINITY, f32::NEG_INFINITY, -0.5])
        .set_requires_grad(true);
    let y = q.f_fake_quantize(&x).unwrap();
    let out = values(&y);
    assert!(out[0].is_nan(), "NaN propagates to the output");
    assert_eq!(out[3], 2.2f32 as f64 * (127.0f32 / 2.2f32) as f64 / (127.0f32 / 2.2f32) as f64);
    assert!(out[1..].iter().all(|v| v.is_finite()), "±inf saturates: {out:?}");
    // A loss whose upstream gradient is NaN exactly where the output is NaN.
    (&y * &y * 0.5).sum(Kind::Float).backward();
    let ga = values(&q.alpha().grad())[0];
    // Clipped: 3.0 (+2.2), +inf (+2.2), -inf (-(-2.2) = +2.2) => upstream y * sign.
    assert!(ga.is_finite(), "alpha's gradient is {ga}");
    assert!((ga - 3.0 * 2.2).abs() < 1e-4, "alpha's gradient is {ga}");
    let gx = values(&x.grad());
    assert_eq!(gx[0], 0.0, "no gradient reaches a NaN input");
    assert!(gx.iter().all(|v| v.is_finite()));
    assert!(values(q.alpha())[0] == 2.2f32 as f64, "alpha itself is untouched");
}

#[test]
fn alpha_pushed_to_zero_or_below_stays_usable_and_recovers() {
    for start in [0.0, -1.0, 1e-9] {
        let vs = nn::VarStore::new(Device::Cpu);
        let q = PACTQuant::new(vs.root(), 8);
        let _ = tch::no_grad(|| q.alpha().shallow_clone().fill_(start));
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 0.3, 1.5]);
        let y = q.f_fake_quantize(&x).unwrap();
        let out = values(&y);
        assert!(out.iter().all(|v| v.is_finite()), "alpha {start}: output {out:?}");
        assert!(
            out.iter().all(|v| v.abs() <= ALPHA_MIN * 1.0001),
            "alpha {start} clips at ALPHA_MIN: {out:?}"
        );
        assert!(q.scale_factor().is_finite());
        // Gradient descent on a loss that wants a wider range brings alpha back.
        let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
        for _ in 0..50 {
            let loss = (q.f_fake_quantize(&x).unwrap() - &x).square().sum(Kind::Float);
            opt.backward_step(&loss);
        }
        let a = q.alpha_value();
        assert!(a > 1.0, "alpha from {start} recovered only to {a}");
    }
}

use tch::nn::OptimizerConfig;

#[test]
fn alpha_tangent_is_sign_times_scale_on_every_path() {
    // The fused CPU pass (contiguous float32/64) and libtorch's path (a strided view) against
    // the formula `((x >= a) - (x <= -a)) * int_max / a`, bit for bit, NaN and infinities included.
    for (kind, alpha) in
        [(Kind::Float, 2.0), (Kind::Double, 0.3), (Kind::Float, f64::NAN), (Kind::Float, 1e30)]
    {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let q = PACTQuant::from_config(
            vs.root(),
            QuantConfig { bitwidth: 6, init_alpha: 1.0, ..Default::default() },
        )
        .unwrap();
        if kind == Kind::Double {
            vs.double();
        }
        let _ = tch::no_grad(|| q.alpha().shallow_clone().fill_(alpha));
        tch::manual_seed(3);
        let x = Tensor::randn([6, 50], (kind, Device::Cpu)) * 2.0;
        let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2.0, -2.0, 0.3, -0.3, 0.0];
        tch::no_grad(|| {
            x.narrow(1, 0, 8).copy_(&Tensor::from_slice(&specials).to_kind(kind).expand([6, 8], false))
        });
        let a = q.alpha_value();
        let a_t = Tensor::from(a).to_kind(kind);
        let scale = a_t.full_like(31.0) / &a_t;
        let want =
            |x: &Tensor| (x.ge_tensor(&a_t).to_kind(kind) - x.le_tensor(&-&a_t).to_kind(kind)) * &scale;
        assert_exact(&q.f_alpha_tangent(&x).unwrap(), &want(&x), "fused pass");
        let strided = x.transpose(0, 1);
        assert!(!strided.is_contiguous());
        assert_exact(&q.f_alpha_tangent(&strided).unwrap(), &want(&strided), "libtorch path");
        let t = values(&q.f_alpha_tangent(&x).unwrap().narrow(0, 0, 1).narrow(1, 0, 3));
        assert_eq!(t[0], 0.0, "NaN has no tangent (alpha {alpha})");
        assert!(t[1] > 0.0 && t[2] < 0.0, "±inf are clipped (alpha {alpha}): {t:?}");
    }
}
