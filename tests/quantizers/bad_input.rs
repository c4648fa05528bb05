//! Bad input: each case gets a clear error or a documented, finite result.

use crate::common;

use common::{cuda_or_skip, values};
use tch::{nn, Device, Kind, Tensor};
use torchapprox::quantizers::{
    f_minmax_quant, f_pact_quant, ApproxQuantizer, MinMaxQuant, NonFinite, PACTQuant, QuantConfig, Quantizer,
    QuantizerKind, MIN_RANGE,
};
use torchapprox::Error;

#[test]
fn bitwidth_out_of_range_names_value_and_range() {
    let vs = nn::VarStore::new(Device::Cpu);
    for bits in [0, 1, 17, 64] {
        let e = MinMaxQuant::f_new(vs.root() / "minmax", bits).unwrap_err();
        assert_eq!(e.to_string(), format!("bitwidth {bits} is out of range: quantizers support 2..=16 bits"));
        assert!(matches!(PACTQuant::f_new(vs.root(), bits), Err(Error::Bitwidth(b)) if b == bits));
        assert!(matches!(Quantizer::f_new(QuantizerKind::Pact, vs.root(), bits), Err(Error::Bitwidth(_))));
    }
    assert!(vs.variables().is_empty(), "a failed constructor leaves no variable behind");
    for bits in 2..=16 {
        assert_eq!(MinMaxQuant::new(vs.root() / "minmax", bits).int_max(), (1 << (bits - 1)) - 1);
    }
}

#[test]
#[should_panic(expected = "bitwidth 40 is out of range")]
fn panicking_constructor_carries_the_message() {
    MinMaxQuant::new(common::scratch().root() / "minmax", 40);
}

#[test]
fn all_zero_input_gives_zeros_and_a_finite_scale() {
    let vs = nn::VarStore::new(Device::Cpu);
    let x = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
    let m = MinMaxQuant::new(vs.root() / "minmax", 8);
    assert!(values(&m.quantize(&x)).iter().all(|v| *v == 0.0));
    assert!(values(&m.f_fake_quantize(&x).unwrap()).iter().all(|v| *v == 0.0));
    assert_eq!(m.scale_factor(), 127.0);
    let p = PACTQuant::new(vs.root(), 8);
    assert!(values(&p.f_fake_quantize(&x).unwrap()).iter().all(|v| *v == 0.0));
    // A subnormal range is raised to MIN_RANGE, keeping the float32 scale finite.
    let tiny = Tensor::from_slice(&[1e-40f32, -1e-41]);
    let out = values(&m.f_fake_quantize(&tiny).unwrap());
    assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
    assert_eq!(m.scale_factor(), (127.0f32 / MIN_RANGE as f32) as f64);
}

#[test]
fn empty_tensor_gives_empty_result() {
    let vs = nn::VarStore::new(Device::Cpu);
    let x = Tensor::zeros([0, 5], (Kind::Float, Device::Cpu));
    let qs: [Box<dyn ApproxQuantizer>; 2] =
        [Box::new(MinMaxQuant::new(vs.root() / "minmax", 4)), Box::new(PACTQuant::new(vs.root(), 4))];
    for q in &qs {
        assert_eq!(q.quantize(&x).size(), [0, 5]);
        assert_eq!(q.f_fake_quantize(&x).unwrap().size(), [0, 5]);
        assert!(q.scale_factor().is_finite());
    }
}

#[test]
fn non_finite_inputs_saturate_propagate_or_are_reported() {
    let vs = nn::VarStore::new(Device::Cpu);
    let x = Tensor::from_slice(&[f32::NAN, -1.0, 0.5, 2.0, f32::INFINITY, f32::NEG_INFINITY]);
    let m = MinMaxQuant::new(vs.root() / "minmax", 8);
    let q = values(&m.quantize(&x));
    assert!(q[0].is_nan());
    // The range comes from the finite elements (2.0): inf saturates, the scale stays finite.
    assert_eq!(&q[1..], &[-64.0, 32.0, 127.0, 127.0, -127.0]);
    assert_eq!(m.scale_factor(), (127.0f32 / 2.0) as f64);
    let p = PACTQuant::new(vs.root(), 8);
    let pq = values(&p.quantize(&x));
    assert!(pq[0].is_nan());
    assert_eq!(&pq[4..], &[127.0, -127.0]);

    // Reject: f_quantize reports the count; state is untouched.
    let strict = QuantConfig { nonfinite: NonFinite::Reject, ..Default::default() };
    let m = MinMaxQuant::from_config(vs.root() / "minmax", strict).unwrap();
    let e = m.f_quantize(&x).unwrap_err();
    assert_eq!(e.to_string(), "input holds 3 non-finite value(s) (NaN or ±inf) out of 6");
    assert_eq!(m.scale_factor(), 0.0, "a rejected call stores no scale");
    let p = PACTQuant::from_config(vs.root() / "strict", strict).unwrap();
    assert!(matches!(p.f_quantize(&x), Err(Error::NonFinite { count: 3, numel: 6 })));
    assert!(p.f_quantize(&Tensor::from_slice(&[1.0f32, 2.0])).is_ok());
    // Only NaN and inf: no finite range at all, so the unit range applies.
    let m = MinMaxQuant::new(vs.root() / "minmax", 8);
    let q = values(&m.quantize(&Tensor::from_slice(&[f32::NAN, f32::INFINITY])));
    assert!(q[0].is_nan() && q[1] == 127.0);
    assert_eq!(m.scale_factor(), 127.0);
}

#[test]
fn integer_dtypes_are_refused_with_their_name() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = PACTQuant::new(vs.root(), 8);
    for kind in [Kind::Int64, Kind::Int, Kind::Uint8, Kind::Bool] {
        let x = Tensor::ones([3], (kind, Device::Cpu));
        let e = MinMaxQuant::new(vs.root() / "minmax", 8).f_quantize(&x).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot quantize a tensor of dtype {kind:?}: expected Float, Double, Half or BFloat16")
        );
        assert!(matches!(p.f_quantize(&x), Err(Error::Dtype(k)) if k == kind));
        assert!(matches!(f_minmax_quant(&x, 1.0, 127), Err(Error::Dtype(_))));
    }
}

#[test]
fn quant_nodes_check_their_arguments() {
    let x = Tensor::from_slice(&[1.0f32]);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = f_minmax_quant(&x, bad, 127).unwrap_err();
        assert!(e.to_string().starts_with("minmax must be between MIN_RANGE (1e-30) and"), "{e}");
    }
    let e = f_minmax_quant(&x, 1.0, 100).unwrap_err();
    assert!(e.to_string().contains("int_max must be 2^(bitwidth-1) - 1"), "{e}");
    let two = Tensor::from_slice(&[1.0f32, 2.0]);
    assert!(f_pact_quant(&x, &two, 127).unwrap_err().to_string().contains("alpha's element count"));
    let vs = nn::VarStore::new(Device::Cpu);
    let e = PACTQuant::from_config(vs.root(), QuantConfig { init_alpha: f64::NAN, ..Default::default() })
        .unwrap_err();
    assert_eq!(e.to_string(), "init_alpha must be finite, got NaN");
}

#[test]
fn unknown_kind_is_named() {
    assert_eq!("minmax".parse::<QuantizerKind>().unwrap(), QuantizerKind::MinMax);
    assert_eq!("PACT".parse::<QuantizerKind>().unwrap(), QuantizerKind::Pact);
    assert_eq!(QuantizerKind::Pact.to_string(), "pact");
    assert_eq!("lsq".parse::<QuantizerKind>().unwrap(), QuantizerKind::Lsq);
    let e = "dorefa".parse::<QuantizerKind>().unwrap_err();
    assert_eq!(e.to_string(), "unknown quantizer kind \"dorefa\": expected `minmax`, `pact` or `lsq`");
}

#[test]
fn input_on_another_device_than_alpha_names_both() {
    let e = Error::Device { input: Device::Cpu, state: Device::Cuda(0), what: "PACT alpha" };
    assert_eq!(e.to_string(), "input is on Cpu but PACT alpha is on Cuda(0): move one of them first");
    let Some(cuda) = cuda_or_skip("device-mismatch error with a real CUDA tensor") else {
        return;
    };
    let vs = nn::VarStore::new(cuda);
    let p = PACTQuant::new(vs.root(), 8);
    let x = Tensor::ones([4], (Kind::Float, Device::Cpu));
    let e = p.f_quantize(&x).unwrap_err();
    assert_eq!(e.to_string(), "input is on Cpu but PACT alpha is on Cuda(0): move one of them first");
    let alpha_cpu = Tensor::from_slice(&[2.2f32]);
    assert!(matches!(f_pact_quant(&x.to_device(cuda), &alpha_cpu, 127), Err(Error::Device { .. })));
}
