//! Invariants that hold for every input, checked on many seeded random tensors and on every device.

use crate::common;

use common::{assert_exact, devices, randn, values};
use tch::{nn, Device, Kind, Tensor};
use torchapprox::quantizers::{
    ApproxQuantizer, MinMaxQuant, PACTQuant, QuantConfig, Quantizer, QuantizerKind,
};

/// Random inputs of varied shape and spread, including heavy tails past alpha.
fn random_inputs(device: Device) -> Vec<Tensor> {
    (0..24)
        .map(|seed| {
            let shape: &[i64] = match seed % 4 {
                0 => &[17],
                1 => &[4, 9],
                2 => &[2, 3, 5, 7],
                _ => &[],
            };
            let spread = [0.01, 1.0, 3.0, 1000.0][seed as usize % 4];
            randn(shape, seed, device) * spread
        })
        .collect()
}

fn quantizers(vs: &nn::VarStore) -> Vec<Quantizer> {
    let mut qs = Vec::new();
    for bits in [2, 3, 4, 8, 12, 16] {
        for kind in [QuantizerKind::MinMax, QuantizerKind::Pact] {
            let cfg =
                QuantConfig { bitwidth: bits, init_alpha: 0.3 + bits as f64 / 4.0, ..Default::default() };
            qs.push(Quantizer::from_config(kind, vs.root() / format!("{kind}{bits}"), cfg).unwrap());
        }
    }
    qs
}

#[test]
fn outputs_are_integers_within_range_and_sign_symmetric() {
    for device in devices() {
        let vs = nn::VarStore::new(device);
        for q in quantizers(&vs) {
            let im = q.int_max() as f64;
            for x in random_inputs(device) {
                let v = q.quantize(&x);
                assert_eq!(v.size(), x.size());
                assert_eq!(v.device(), device);
                for e in values(&v) {
                    assert!(e.abs() <= im && e.fract() == 0.0, "{q:?}: {e} not an integer in ±{im}");
                }
                // Round-half-to-even and the symmetric clamp make quantization odd.
                let neg = q.quantize(&x.neg());
                assert_exact(&neg, &v.neg(), &format!("{:?} {} bits: q(-x) = -q(x)", q.kind(), q.bitwidth()));
            }
        }
    }
}

#[test]
fn fake_quantization_is_idempotent() {
    for device in devices() {
        let vs = nn::VarStore::new(device);
        for q in quantizers(&vs) {
            for x in random_inputs(device) {
                let once = q.f_fake_quantize(&x).unwrap();
                let scale_once = q.scale_factor();
                let twice = q.f_fake_quantize(&once).unwrap();
                // Same integers again; MinMax's range may shrink to the largest grid point, which is the same.
                assert_exact(
                    &q.quantize(&once),
                    &q.quantize(&twice),
                    &format!("{:?} {} bits", q.kind(), q.bitwidth()),
                );
                let rel = (q.scale_factor() - scale_once).abs() / scale_once;
                assert!(rel < 1e-5, "{:?}: scale moved from {scale_once} to {}", q.kind(), q.scale_factor());
                let err = (&twice - &once).abs().max().double_value(&[]);
                let step = 1.0 / scale_once;
                assert!(
                    err <= step * 1e-3,
                    "{:?} {} bits: fq(fq(x)) moved by {err} (step {step})",
                    q.kind(),
                    q.bitwidth()
                );
            }
        }
    }
}

#[test]
fn fake_quantization_error_is_at_most_half_a_step_inside_the_range() {
    let vs = nn::VarStore::new(Device::Cpu);
    for q in quantizers(&vs) {
        for x in random_inputs(Device::Cpu) {
            let y = q.f_fake_quantize(&x).unwrap();
            let step = 1.0 / q.scale_factor();
            let limit = q.int_max() as f64 * step;
            let inside = x.abs().le(limit);
            let err = (&y - &x).abs().where_scalarother(&inside, 0.0).max().double_value(&[]);
            // Half a step, plus float32 rounding of the scaled value (matters at 16 bits).
            let ulps = 4.0 * f32::EPSILON as f64 * limit;
            assert!(
                err <= 0.5 * step + ulps,
                "{:?} {} bits: error {err} > half step {step}",
                q.kind(),
                q.bitwidth()
            );
        }
    }
}

#[test]
fn cpu_and_cuda_agree() {
    let Some(cuda) = common::cuda_or_skip("CPU == CUDA agreement of quantize and gradients") else {
        return;
    };
    let vs_cpu = nn::VarStore::new(Device::Cpu);
    let vs_gpu = nn::VarStore::new(cuda);
    for (a, b) in quantizers(&vs_cpu).into_iter().zip(quantizers(&vs_gpu)) {
        for x in random_inputs(Device::Cpu) {
            let xc = x.detach().set_requires_grad(true);
            let xg = x.to_device(cuda).detach().set_requires_grad(true);
            let (qa, qb) = (a.quantize(&xc), b.quantize(&xg));
            assert_exact(&qb, &qa, &format!("{:?} {} bits CUDA vs CPU", a.kind(), a.bitwidth()));
            assert_eq!(a.scale_factor(), b.scale_factor());
            a.f_fake_quantize(&xc).unwrap().sum(Kind::Float).backward();
            b.f_fake_quantize(&xg).unwrap().sum(Kind::Float).backward();
            common::assert_close(&xg.grad(), &xc.grad(), 1e-6, 1e-6, "x gradient CUDA vs CPU");
        }
    }
}

#[test]
fn minmax_scale_tracks_the_last_call() {
    let q = MinMaxQuant::new(common::scratch().root() / "minmax", 8);
    assert_eq!(q.scale_factor(), 0.0);
    let _ = q.quantize(&Tensor::from_slice(&[0.5f32, -4.0]));
    assert_eq!(q.scale_factor(), (127.0f32 / 4.0) as f64);
    let qd = q.f_quantize_scaled(&Tensor::from_slice(&[0.25f64])).unwrap();
    assert_eq!(q.scale_factor(), 127.0 / 0.25);
    assert_eq!(qd.scale.kind(), Kind::Double);
    assert_eq!(qd.scale.double_value(&[]), 508.0);
    let vs = nn::VarStore::new(Device::Cpu);
    let p = PACTQuant::new(vs.root(), 4);
    assert_eq!(p.scale_factor(), (7.0f32 / 2.2f32) as f64);
}

#[test]
fn fused_cpu_kernels_match_the_libtorch_path_values_and_gradients() {
    // A non-contiguous view of the same values takes the general libtorch path.
    for (rows, cols) in [(3, 5), (64, 33), (1024, 520)] {
        for spread in [0.01, 1.5, 40.0] {
            tch::manual_seed(rows);
            let base = Tensor::randn([cols, rows], (Kind::Float, Device::Cpu)) * spread;
            for bits in [2, 4, 8, 16] {
                let vs = nn::VarStore::new(Device::Cpu);
                for kind in [QuantizerKind::MinMax, QuantizerKind::Pact] {
                    let cfg = QuantConfig { bitwidth: bits, init_alpha: 0.7 * spread, ..Default::default() };
                    let q = Quantizer::from_config(kind, vs.root() / format!("{kind}{bits}"), cfg).unwrap();
                    let what = format!("{kind} {bits} bits {rows}x{cols} spread {spread}");
                    let fused_x = base.tr().contiguous().detach().set_requires_grad(true);
                    let general_x = base.copy().detach().set_requires_grad(true);
                    let general_in = general_x.tr();
                    assert!(!general_in.is_contiguous());
                    let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
                    for integers in [false, true] {
                        let run =
                            |x: &Tensor| if integers { q.quantize(x) } else { q.f_fake_quantize(x).unwrap() };
                        let a = run(&fused_x);
                        let alpha_grad = |q: &Quantizer| {
                            q.alpha().map(|a| a.grad()).filter(|g| g.defined()).map(|g| values(&g))
                        };
                        (&a * &w).sum(Kind::Float).backward();
                        let (ga, aa) = (fused_x.grad().copy(), alpha_grad(&q));
                        let _ = fused_x.grad().zero_();
                        if let Some(alpha) = q.alpha() {
                            let _ = alpha.grad().zero_();
                        }
                        let b = run(&general_in);
                        assert_exact(&a, &b, &format!("{what}: values, integers {integers}"));
                        (&b * &w).sum(Kind::Float).backward();
                        common::assert_close(
                            &ga,
                            &general_x.grad().tr(),
                            1e-6,
                            1e-6,
                            &format!("{what}: x gradient"),
                        );
                        let _ = general_x.grad().zero_();
                        if let (Some(aa), Some(ab)) = (aa, alpha_grad(&q)) {
                            let tol = 1e-4 * (1.0 + aa[0].abs());
                            assert!(
                                (aa[0] - ab[0]).abs() <= tol,
                                "{what}: alpha gradient {} vs {}",
                                aa[0],
                                ab[0]
                            );
                            let _ = q.alpha().unwrap().grad().zero_();
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fake_quantize_out_writes_the_same_values_into_a_reused_buffer() {
    let vs = nn::VarStore::new(Device::Cpu);
    for q in quantizers(&vs) {
        for x in random_inputs(Device::Cpu) {
            let expected = q.f_fake_quantize(&x).unwrap();
            let mut out = x.empty_like();
            q.f_fake_quantize_out(&x, &mut out).unwrap();
            assert_exact(&out, &expected, &format!("{:?} {} bits into a buffer", q.kind(), q.bitwidth()));
            // A buffer of another dtype takes the general path and still gets the values.
            let mut wide = x.to_kind(Kind::Double).zeros_like();
            q.f_fake_quantize_out(&x, &mut wide).unwrap();
            assert_exact(&wide, &expected, "float64 buffer");
        }
    }
}
