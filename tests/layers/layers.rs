//! ApproxLinear and ApproxConv2d: exact integer arithmetic, baselines, gradients, noise, PyTorch fixtures.

use crate::common;

use common::{assert_close, assert_exact, load_fixture, values};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};
use torchapprox::layers::{
    approx_conv2d, approx_linear, ApproxConv2d, ApproxConvConfig, ApproxLayer, ApproxLinear,
    ApproxLinearConfig, ApproxModule, InferenceMode, QuantSpec,
};
use torchapprox::models::Architecture;
use torchapprox::quantizers::{ApproxQuantizer, QuantizerKind};

fn spec(mode: InferenceMode, bits: u32) -> QuantSpec {
    QuantSpec { mode, bitwidth: bits, ..Default::default() }
}

#[test]
fn quantized_linear_equals_an_explicit_integer_computation() {
    for (bits, per_channel) in [(8, false), (4, false), (8, true), (2, true)] {
        tch::manual_seed(bits as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let s = QuantSpec { per_channel, ..spec(InferenceMode::Quantized, bits) };
        let layer =
            approx_linear(vs.root() / "fc", 6, 4, ApproxLinearConfig { quant: s, ..Default::default() });
        // Inside PACT's initial clipping level (2.2), so 8 bits stay close to float.
        let x = Tensor::rand([5, 6], (Kind::Float, Device::Cpu)) * 4.0 - 2.0;
        let y = layer.forward_t(&x, false);
        // The same integers, multiplied in int64.
        let qx = layer.quant.x_quantizer().f_quantize_scaled(&x).unwrap();
        let qw = layer.quant.w_quantizer().f_quantize_scaled(&layer.weight).unwrap();
        let acc = qx.values.to_kind(Kind::Int64).matmul(&qw.values.to_kind(Kind::Int64).tr());
        let w_scale = if per_channel { qw.scale.reshape([-1]) } else { qw.scale };
        let expected = acc.to_kind(Kind::Float) / (&qx.scale * &w_scale) + layer.bias.as_ref().unwrap();
        assert_exact(&y, &expected, &format!("{bits} bits, per channel {per_channel}"));
        // And the result really is quantized: different from the float layer, close at 8 bits.
        layer.quant.set_mode(InferenceMode::Baseline);
        let float = layer.forward_t(&x, false);
        assert!(!y.equal(&float));
        if bits == 8 {
            let diff = (&y - &float).abs().max().double_value(&[]);
            assert!(diff < 0.1, "8-bit output strays from float by {diff}");
        }
    }
}

#[test]
fn quantized_conv_equals_an_explicit_integer_computation() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ApproxConvConfig {
        padding: 1,
        stride: 2,
        quant: spec(InferenceMode::Quantized, 8),
        ..Default::default()
    };
    let conv = approx_conv2d(vs.root() / "conv", 3, 5, 3, cfg);
    let x = Tensor::randn([2, 3, 7, 7], (Kind::Float, Device::Cpu));
    let y = conv.forward_t(&x, false);
    let qx = conv.quant.x_quantizer().f_quantize_scaled(&x).unwrap();
    let qw = conv.quant.w_quantizer().f_quantize_scaled(&conv.weight).unwrap();
    // float64 holds these integer sums exactly (|sum| < 2^53).
    let acc = qx.values.to_kind(Kind::Double).conv2d(
        &qw.values.to_kind(Kind::Double),
        None::<Tensor>,
        [2, 2],
        [1, 1],
        [1, 1],
        1,
    );
    assert_eq!(values(&acc).iter().filter(|v| v.fract() != 0.0).count(), 0);
    let expected =
        acc.to_kind(Kind::Float) / (&qx.scale * &qw.scale) + conv.bias.as_ref().unwrap().reshape([-1, 1, 1]);
    assert_exact(&y, &expected, "quantized conv");
}

#[test]
fn baseline_equals_tch_layers_on_the_same_weights() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let lin = nn::linear(vs.root() / "ref_fc", 7, 3, Default::default());
    let ours = ApproxLinear::from_linear(vs.root() / "fc", &lin, QuantSpec::default()).unwrap();
    let x = Tensor::randn([4, 7], (Kind::Float, Device::Cpu));
    assert_exact(&ours.forward_t(&x, true), &lin.forward(&x), "baseline linear");

    let cfg = nn::ConvConfig { stride: 2, padding: 1, groups: 2, ..Default::default() };
    let conv = nn::conv2d(vs.root() / "ref_conv", 4, 6, 3, cfg);
    let acfg = ApproxConvConfig { stride: 2, padding: 1, groups: 2, ..Default::default() };
    let ours = ApproxConv2d::from_conv2d(vs.root() / "conv", &conv, acfg).unwrap();
    let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    assert_exact(&ours.forward_t(&x, false), &conv.forward(&x), "baseline conv");
}

/// Objective for gradient checks: a fixed weighted sum of the layer's output.
fn objective(layer: &ApproxLinear, x: &Tensor, w: &Tensor) -> Tensor {
    (layer.forward_t(x, true) * w).sum(Kind::Double)
}

#[test]
fn gradients_reach_weight_bias_and_every_alpha() {
    // PACT on both sides so that both alphas are variables; float64 throughout.
    let s = QuantSpec {
        x_kind: QuantizerKind::Pact,
        w_kind: QuantizerKind::Pact,
        ..spec(InferenceMode::Quantized, 8)
    };
    let build = |rounded: bool| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(9);
        let l = approx_linear(
            vs.root() / "fc",
            3,
            2,
            ApproxLinearConfig { quant: QuantSpec { rounded, ..s }, ..Default::default() },
        );
        vs.double();
        // Weights past w_quantizer's alpha, inputs past x_quantizer's alpha.
        tch::no_grad(|| {
            l.weight.shallow_clone().copy_(&Tensor::from_slice2(&[[0.9f64, -3.1, 0.4], [2.7, 0.2, -0.6]]));
            let _ = l.quant.x_quantizer().alpha().unwrap().shallow_clone().fill_(1.3);
            let _ = l.quant.w_quantizer().alpha().unwrap().shallow_clone().fill_(2.1);
        });
        (vs, l)
    };
    let x = Tensor::from_slice2(&[[0.5f64, -2.0, 1.1], [1.7, 0.3, -0.8]]);
    let w = Tensor::from_slice2(&[[1.0f64, -0.5], [0.25, 2.0]]);
    // Autograd and finite differences of the smooth layer (rounding off) must agree;
    // the rounded layer runs the same gradient code on rounded values, so it stays close.
    let (vs, layer) = build(true);
    objective(&layer, &x, &w).backward();
    let (svs, smooth) = build(false);
    objective(&smooth, &x, &w).backward();
    let vars = svs.variables();
    let rounded = vs.variables();
    let mut names: Vec<_> = vars.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["fc.bias", "fc.w_quantizer.alpha", "fc.weight", "fc.x_quantizer.alpha"]);
    for name in &names {
        let grad = values(&vars[name].grad());
        let target = &vars[name];
        for (i, g) in grad.iter().enumerate() {
            let h = 1e-6;
            let bump = |d: f64| {
                tch::no_grad(|| {
                    let flat = target.shallow_clone().view([-1]);
                    let _ = flat.get(i as i64).shallow_clone().f_add_scalar_(d).unwrap();
                });
            };
            bump(h);
            let up = objective(&smooth, &x, &w).double_value(&[]);
            bump(-2.0 * h);
            let down = objective(&smooth, &x, &w).double_value(&[]);
            bump(h);
            let fd = (up - down) / (2.0 * h);
            assert!(
                (g - fd).abs() < 1e-5 * (1.0 + fd.abs()),
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g
            );
        }
        assert!(grad.iter().any(|g| g.abs() > 1e-3), "{name} gets no gradient: {grad:?}");
        assert_close(
            &rounded[name].grad(),
            &vars[name].grad(),
            0.0,
            0.05,
            &format!("{name}: rounded vs smooth gradient"),
        );
    }
}

#[test]
fn noise_appears_only_in_training() {
    tch::manual_seed(4);
    let vs = nn::VarStore::new(Device::Cpu);
    let s = QuantSpec { noise_std: 0.2, ..spec(InferenceMode::Noise, 8) };
    let layer = approx_linear(vs.root(), 64, 64, ApproxLinearConfig { quant: s, ..Default::default() });
    let x = Tensor::randn([256, 64], (Kind::Float, Device::Cpu));
    let eval = layer.forward_t(&x, false);
    layer.quant.set_mode(InferenceMode::Quantized);
    let quant = layer.forward_t(&x, true);
    assert_exact(&eval, &quant, "noise mode in evaluation equals quantized mode");
    layer.quant.set_mode(InferenceMode::Noise);
    let noisy = layer.forward_t(&x, true);
    let bias = layer.bias.as_ref().unwrap();
    let expected = 0.2 * (&quant - bias).std(true).double_value(&[]);
    let got = (&noisy - &quant).std(true).double_value(&[]);
    assert!((got / expected - 1.0).abs() < 0.05, "noise std {got}, expected {expected}");
}

#[test]
fn grouped_dilated_and_depthwise_convolutions_match_pytorch() {
    let f = load_fixture("layers.safetensors");
    for name in ["grouped", "depthwise", "dilated"] {
        let g = values(&f[&format!("{name}.geometry")]);
        let [stride, padding, dilation, groups] = [g[0], g[1], g[2], g[3]].map(|v| v as i64);
        let x = &f[&format!("{name}.x")];
        for (key, bits, per_channel, mode) in [
            ("float", 8, false, InferenceMode::Baseline),
            ("q4", 4, false, InferenceMode::Quantized),
            ("q8", 8, false, InferenceMode::Quantized),
            ("q4_pc", 4, true, InferenceMode::Quantized),
            ("q8_pc", 8, true, InferenceMode::Quantized),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = ApproxConvConfig {
                stride,
                padding,
                dilation,
                groups,
                bias: true,
                quant: QuantSpec { per_channel, ..spec(mode, bits) },
            };
            let conv = ApproxConv2d::from_tensors(
                vs.root(),
                &f[&format!("{name}.weight")],
                Some(&f[&format!("{name}.bias")]),
                cfg,
            )
            .unwrap();
            let expected = &f[&format!("{name}.{key}")];
            assert_close(&conv.forward_t(x, false), expected, 1e-5, 1e-5, &format!("{name} {key}"));
            let k = conv.weight.size();
            assert_eq!(conv.fan_in(), k[1] * k[2] * k[3]);
            assert_eq!(
                conv.opcount(),
                expected.size()[1] * expected.size()[2] * expected.size()[3] * conv.fan_in()
            );
        }
    }
}

#[test]
fn variables_use_pytorch_names_and_modes_switch_network_wide() {
    let vs = nn::VarStore::new(Device::Cpu);
    let s = QuantSpec { w_kind: QuantizerKind::Pact, ..Default::default() };
    let net = Architecture::LeNet5.build(&vs.root(), |_| s).unwrap();
    let mut names: Vec<_> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names.len(), 5 * 4);
    for layer in Architecture::LeNet5.layer_names() {
        for var in ["bias", "weight", "x_quantizer.alpha", "w_quantizer.alpha"] {
            assert!(names.contains(&format!("{layer}.{var}")), "missing {layer}.{var} in {names:?}");
        }
    }
    assert!(net.approx_layers().iter().all(|(_, l)| l.quant().mode() == InferenceMode::Baseline));
    net.set_mode(InferenceMode::Quantized);
    assert!(net.approx_layers().iter().all(|(_, l)| l.quant().mode() == InferenceMode::Quantized));
    let x = Tensor::randn([3, 1, 28, 28], (Kind::Float, Device::Cpu));
    assert_eq!(net.forward_t(&x, false).size(), [3, 10]);
    let ops: Vec<i64> = net.approx_layers().iter().map(|(_, l)| l.opcount()).collect();
    assert_eq!(ops, [6 * 28 * 28 * 25, 16 * 10 * 10 * 150, 400 * 120, 120 * 84, 84 * 10]);
    let fan: Vec<i64> = net.approx_layers().iter().map(|(_, l)| l.fan_in()).collect();
    assert_eq!(fan, [25, 150, 400, 120, 84]);
    // A wrong input shape is an error, not a libtorch panic.
    let e = net.f_forward_t(&Tensor::zeros([2, 784], (Kind::Float, Device::Cpu)), false).unwrap_err();
    assert_eq!(e.to_string(), "lenet input: expected shape [N, 1, 28, 28], got [2, 784]");
}

#[test]
fn bad_layer_configurations_are_errors() {
    let vs = nn::VarStore::new(Device::Cpu);
    let pc_pact = QuantSpec { per_channel: true, w_kind: QuantizerKind::Pact, ..Default::default() };
    let e = ApproxLinear::f_new(vs.root(), 3, 2, ApproxLinearConfig { quant: pc_pact, ..Default::default() })
        .unwrap_err();
    assert_eq!(e.to_string(), "per-channel weight quantization needs MinMax, not pact");
    let e =
        ApproxConv2d::f_new(vs.root() / "c", 3, 4, 3, ApproxConvConfig { groups: 2, ..Default::default() })
            .unwrap_err();
    assert!(
        e.to_string().starts_with("groups must be at least 1 and a divisor of both channel counts, got 2"),
        "{e}"
    );
    let e = ApproxLinear::from_tensors(
        vs.root() / "w",
        &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        None,
        QuantSpec::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("expected shape [out_features, in_features], got [3]"), "{e}");
    let bad_bits = QuantSpec { bitwidth: 17, ..Default::default() };
    assert!(ApproxLinear::f_new(
        vs.root() / "b",
        3,
        2,
        ApproxLinearConfig { quant: bad_bits, ..Default::default() }
    )
    .is_err());
    assert_eq!("noise".parse::<InferenceMode>().unwrap(), InferenceMode::Noise);
    assert!("fp8"
        .parse::<InferenceMode>()
        .unwrap_err()
        .to_string()
        .contains("unknown inference mode \"fp8\""));
}

#[test]
fn first_layer_alpha_gradient_matches_with_and_without_an_input_gradient() {
    // An input without gradient takes the tangent route; the same input with gradient
    // takes ordinary backpropagation through the convolution. Alpha's gradient must agree.
    // One input channel takes the second-channel route where its integer sums are exact
    // (4 bits) and the extra-forward route where they may round (16 bits).
    for (padding, groups, cin, bits) in [(2, 1, 1, 4), (2, 1, 1, 16), (0, 1, 3, 4), (1, 3, 3, 4)] {
        tch::manual_seed(21);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ApproxConvConfig {
            padding,
            groups,
            quant: spec(InferenceMode::Quantized, bits),
            ..Default::default()
        };
        let conv = approx_conv2d(vs.root(), cin, 6, 5, cfg);
        let _ = tch::no_grad(|| conv.quant.x_quantizer().alpha().unwrap().shallow_clone().fill_(0.9));
        let x = Tensor::randn([4, cin, 12, 12], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([4, 6, 12 - 4 + 2 * padding, 12 - 4 + 2 * padding], (Kind::Float, Device::Cpu));
        let alpha = conv.quant.x_quantizer().alpha().unwrap();
        let run = |x: &Tensor| {
            let y = conv.forward_t(x, true);
            (&y * &w).sum(Kind::Float).backward();
            let (g, wg) = (alpha.grad().copy(), conv.weight.grad().copy());
            let _ = alpha.grad().zero_();
            let _ = conv.weight.grad().zero_();
            (y.detach(), g, wg)
        };
        let (y1, g1, w1) = run(&x);
        let (y2, g2, w2) = run(&x.detach().set_requires_grad(true));
        assert_exact(&y1, &y2, "outputs");
        assert_close(&g1, &g2, 1e-4, 1e-4, "alpha gradient");
        assert_close(&w1, &w2, 1e-5, 1e-5, "weight gradient");
        assert!(values(&g1)[0].abs() > 1e-3, "alpha gets a gradient: {g1:?}");
        // An unbatched input `[C, H, W]` (which a one-channel convolution's second channel
        // would join along rows, so it takes the extra-forward route) gives the gradients of
        // a batch of one.
        let one = |x: &Tensor, w: &Tensor| {
            let y = conv.forward_t(x, true);
            (&y * w).sum(Kind::Float).backward();
            let g = alpha.grad().copy();
            let _ = alpha.grad().zero_();
            let _ = conv.weight.grad().zero_();
            (y.detach(), g)
        };
        let (y3, g3) = one(&x.get(0), &w.get(0));
        let (y4, g4) = one(&x.narrow(0, 0, 1), &w.narrow(0, 0, 1));
        assert_exact(&y3, &y4.get(0), "unbatched output");
        assert_exact(&y3, &y1.get(0), "unbatched output against the batch");
        assert_close(&g3, &g4, 1e-4, 1e-4, "unbatched alpha gradient");
    }
}

#[test]
fn first_layer_alpha_that_is_not_finite_gets_no_gradient() {
    // A NaN or infinite alpha clips at the nearest level in effect and gets a zero
    // gradient, on the second-channel route (one channel) and the extra-forward one.
    for (cin, value) in [(1, f64::NAN), (1, f64::INFINITY), (3, f64::NAN)] {
        tch::manual_seed(22);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg =
            ApproxConvConfig { padding: 1, quant: spec(InferenceMode::Quantized, 8), ..Default::default() };
        let conv = approx_conv2d(vs.root(), cin, 4, 3, cfg);
        let alpha = conv.quant.x_quantizer().alpha().unwrap();
        let _ = tch::no_grad(|| alpha.shallow_clone().fill_(value));
        let x = Tensor::randn([2, cin, 6, 6], (Kind::Float, Device::Cpu));
        let y = conv.forward_t(&x, true);
        assert_eq!(values(&y.isfinite().all().to_kind(Kind::Float)), [1.0], "{cin} {value}: finite output");
        y.sum(Kind::Float).backward();
        assert_eq!(values(&alpha.grad()), [0.0], "{cin} {value}: alpha gradient");
        assert!(values(&conv.weight.grad()).iter().all(|v| v.is_finite()), "{cin} {value}: weight gradient");
    }
}

#[test]
fn one_output_channel_per_channel_keeps_unbatched_shapes() {
    // A per-channel weight scale of one channel still broadcasts as the output's channels:
    // an unbatched input keeps its shape (the scale once added a dimension).
    tch::manual_seed(23);
    let vs = nn::VarStore::new(Device::Cpu);
    let quant = QuantSpec { per_channel: true, ..spec(InferenceMode::Quantized, 8) };
    let conv = approx_conv2d(vs.root() / "c", 2, 1, 3, ApproxConvConfig { quant, ..Default::default() });
    let x = Tensor::randn([2, 5, 5], (Kind::Float, Device::Cpu));
    let y = conv.forward_t(&x, false);
    assert_eq!(y.size(), [1, 3, 3]);
    assert_exact(&y, &conv.forward_t(&x.unsqueeze(0), false).get(0), "unbatched conv");
    let fc = approx_linear(vs.root() / "l", 4, 1, ApproxLinearConfig { quant, ..Default::default() });
    let v = Tensor::randn([4], (Kind::Float, Device::Cpu));
    let y = fc.forward_t(&v, false);
    assert_eq!(y.size(), [1]);
    assert_exact(&y, &fc.forward_t(&v.unsqueeze(0), false).get(0), "1-D linear");
}
