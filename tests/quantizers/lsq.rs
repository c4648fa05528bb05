//! LSQ (learned step size): values, finite-difference gradients of the unrounded quantizer in
//! float64, invariants on random inputs, initialisation in layers, training through the trainer.

use crate::common;

use std::process::Command;

use common::{assert_close, assert_exact, example_bin, values, TempDir};
use tch::{nn, Device, Kind, Tensor};
use torchapprox::data::Mnist;
use torchapprox::layers::{ApproxLayer, ApproxLinear, ApproxLinearConfig, QuantSpec};
use torchapprox::quantizers::{ApproxQuantizer, LSQQuant, QuantConfig, Quantizer, QuantizerKind};

fn lsq(vs: &nn::VarStore, bits: u32, init_alpha: f64, rounded: bool) -> LSQQuant {
    LSQQuant::from_config(
        vs.root() / "q",
        QuantConfig { bitwidth: bits, init_alpha, rounded, ..Default::default() },
    )
    .unwrap()
}

#[test]
fn values_are_the_rounded_clipped_ratio_and_keep_the_invariants() {
    for bits in [2, 4, 8] {
        let vs = nn::VarStore::new(Device::Cpu);
        let q = lsq(&vs, bits, 1.7, true);
        let im = ((1i64 << (bits - 1)) - 1) as f64;
        let x = common::randn(&[1000], bits as i64, Device::Cpu) * 2.0;
        let s = q.step_size().reshape([]);
        let expected = (&x / &s).clamp(-im, im).round();
        assert_exact(&q.quantize(&x), &expected, &format!("{bits} bits: integers"));
        let fq = q.f_fake_quantize(&x).unwrap();
        assert_exact(&fq, &(&expected * &s), &format!("{bits} bits: fake quantization"));
        // Sign symmetry, idempotence, range.
        assert_exact(&q.quantize(&x.neg()), &expected.neg(), "q(-x) = -q(x)");
        assert_exact(&q.f_fake_quantize(&fq).unwrap(), &fq, "idempotent");
        assert!(values(&expected).iter().all(|v| v.abs() <= im));
        assert_eq!(q.scale_factor(), 1.0 / values(q.step_size())[0]);
    }
}

#[test]
fn gradients_match_finite_differences_of_the_unrounded_quantizer() {
    for bits in [3, 8] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let q = lsq(&vs, bits, 1.3, false);
        vs.double(); // the step size in float64 too, so that tiny bumps are exact
        let x = (common::randn(&[64], 9, Device::Cpu) * 2.0).to_kind(Kind::Double);
        let w = common::randn(&[64], 10, Device::Cpu).to_kind(Kind::Double);
        let objective = |x: &Tensor| (q.f_fake_quantize(x).unwrap() * &w).sum(Kind::Double);
        let xg = x.detach().set_requires_grad(true);
        objective(&xg).backward();
        let (gx, gs) = (values(&xg.grad()), values(&q.step_size().grad())[0]);
        let h = 1e-6;
        let fd_x: Vec<f64> = (0..64)
            .map(|i| {
                let bump = |d: f64| {
                    let xp = x.copy();
                    let _ = xp.get(i).fill_(x.double_value(&[i]) + d);
                    objective(&xp).double_value(&[])
                };
                (bump(h) - bump(-h)) / (2.0 * h)
            })
            .collect();
        assert_close(
            &Tensor::from_slice(&gx),
            &Tensor::from_slice(&fd_x),
            1e-6,
            1e-6,
            &format!("{bits} bits: d/dx"),
        );
        let s0 = q.step_size().double_value(&[0]);
        let at = |v: f64| {
            let _ = tch::no_grad(|| q.step_size().shallow_clone().fill_(v));
            objective(&x).double_value(&[])
        };
        let fd_s = (at(s0 + h) - at(s0 - h)) / (2.0 * h);
        at(s0);
        // LSQ scales the step size's gradient by 1 / sqrt(numel * int_max).
        let g = 1.0 / (64.0 * ((1i64 << (bits - 1)) - 1) as f64).sqrt();
        assert!((gs / g - fd_s).abs() <= 1e-6 * (1.0 + fd_s.abs()), "{bits} bits: d/ds {} vs {fd_s}", gs / g);
    }
}

#[test]
fn nan_inputs_never_reach_the_step_size_and_integer_gradients_are_scaled() {
    let vs = nn::VarStore::new(Device::Cpu);
    let q = lsq(&vs, 8, 2.2, true);
    let x = Tensor::from_slice(&[f32::NAN, 0.5, -3.0, f32::INFINITY]).set_requires_grad(true);
    q.f_fake_quantize(&x).unwrap().sum(Kind::Float).backward();
    let g = values(&q.step_size().grad())[0];
    assert!(g.is_finite(), "step size gradient {g}");
    assert!(values(&x.grad()).iter().all(|v| v.is_finite()));
    // The integers' gradient is the dequantized one over s (the scale is a constant).
    let x2 = Tensor::from_slice(&[0.3f32, -1.1, 5.0]).set_requires_grad(true);
    q.quantize(&x2).sum(Kind::Float).backward();
    let s = values(q.step_size())[0];
    assert_eq!(
        values(&x2.grad()),
        [1.0 / s as f32 as f64, 1.0 / s as f32 as f64, 0.0].map(|v: f64| (v as f32) as f64)
    );
}

#[test]
fn layers_start_lsq_weights_from_data_and_the_trainer_learns_with_lsq() {
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = QuantSpec {
        x_kind: QuantizerKind::Lsq,
        w_kind: QuantizerKind::Lsq,
        bitwidth: 4,
        ..Default::default()
    };
    let fc = ApproxLinear::f_new(vs.root() / "fc", 50, 20, ApproxLinearConfig { bias: true, quant: spec })
        .unwrap();
    let mean = values(&fc.weight().abs().mean(Kind::Double))[0];
    let step = values(fc.quant().w_quantizer().step_size().unwrap())[0];
    assert!((step - 2.0 * mean / 7f64.sqrt()).abs() < 1e-6, "{step} vs {}", 2.0 * mean / 7f64.sqrt());
    assert!(matches!(fc.quant().x_quantizer(), Quantizer::Lsq(_)));
    assert!(vs.variables().contains_key("fc.x_quantizer.step_size"));

    let tmp = TempDir::new("lsq");
    let data = tmp.0.join("small");
    let dir = common::embedded_dir();
    Mnist::load_dir(&dir).unwrap().subset(2000, 500).save_dir(&data).unwrap();
    let o = Command::new(example_bin("train"))
        .args(["--data", data.to_str().unwrap(), "--model", "mlp", "--x-quant", "lsq", "--w-quant", "lsq"])
        .args(["--bits", "4", "--epochs", "2", "--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["test_accuracy"].as_f64().unwrap() > 0.7, "{r}");
    let x_step = r["layers"][0]["x_quantizer"]["step_size"].as_f64().unwrap();
    assert!((x_step - 2.2 / 7.0).abs() > 1e-4, "the input step size did not learn: {x_step}");
}
