//! Learning tests: PACT's alpha learns, a mixed MinMax/PACT network trains, and checkpoints round-trip.

use crate::common;

use common::{assert_exact, devices, values};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use torchapprox::quantizers::{ApproxQuantizer, PACTQuant, Quantizer, QuantizerKind};

#[test]
fn pact_alpha_moves_toward_the_data_range_and_loss_falls() {
    for device in devices() {
        tch::manual_seed(7);
        // Data spread to about ±6, well past the initial alpha of 2.2.
        let x = Tensor::randn([4096], (Kind::Float, device)) * 2.0;
        let vs = nn::VarStore::new(device);
        let q = PACTQuant::new(vs.root() / "act", 8);
        let mut opt = nn::Adam::default().build(&vs, 0.05).unwrap();
        let loss_of = |q: &PACTQuant| (q.forward(&x) - &x).square().mean(Kind::Float);
        let first = loss_of(&q).double_value(&[]);
        for _ in 0..200 {
            opt.backward_step(&loss_of(&q));
        }
        let last = loss_of(&q).double_value(&[]);
        let alpha = q.alpha_value();
        let max_abs = x.abs().max().double_value(&[]);
        assert!(
            alpha > 4.0 && alpha <= max_abs + 0.5,
            "{device:?}: alpha went from 2.2 to {alpha} (data max {max_abs})"
        );
        assert!(last < first * 0.1, "{device:?}: loss fell only from {first} to {last}");
    }
}

/// Two quantized layers: MinMax on the first layer's input, PACT on the second's.
fn mixed_net(vs: &nn::Path) -> impl Module {
    nn::seq()
        .add(Quantizer::new(QuantizerKind::MinMax, vs / "q1", 8))
        .add(nn::linear(vs / "fc1", 8, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(Quantizer::new(QuantizerKind::Pact, vs / "q2", 4))
        .add(nn::linear(vs / "fc2", 32, 1, Default::default()))
}

#[test]
fn mixed_minmax_pact_network_trains_and_round_trips_through_safetensors() {
    tch::manual_seed(11);
    let x = Tensor::randn([512, 8], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([8, 1], (Kind::Float, Device::Cpu));
    let y = (x.matmul(&w)).tanh() * 3.0;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = mixed_net(&vs.root());
    let alpha0 = values(&vs.variables()["q2.alpha"]);
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let loss = |net: &dyn Module| (net.forward(&x) - &y).square().mean(Kind::Float).double_value(&[]);
    let first = loss(&net);
    for _ in 0..300 {
        opt.backward_step(&(net.forward(&x) - &y).square().mean(Kind::Float));
    }
    let last = loss(&net);
    assert!(last < first * 0.2, "loss fell only from {first} to {last}");
    let alpha1 = values(&vs.variables()["q2.alpha"]);
    assert!((alpha1[0] - alpha0[0]).abs() > 1e-3, "PACT alpha did not move: {alpha0:?} -> {alpha1:?}");

    let dir = std::env::temp_dir().join(format!("torchapprox-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mixed.safetensors");
    vs.save(&path).unwrap();
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let net2 = mixed_net(&vs2.root());
    vs2.load(&path).unwrap();
    let names: Vec<String> = {
        let mut n: Vec<_> = vs2.variables().into_keys().collect();
        n.sort();
        n
    };
    assert_eq!(names, ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "q2.alpha"]);
    assert_exact(&vs2.variables()["q2.alpha"], &vs.variables()["q2.alpha"], "alpha after load");
    assert_exact(&net2.forward(&x), &net.forward(&x), "outputs after load");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quantizer_enum_reports_kind_and_alpha() {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = Quantizer::new(QuantizerKind::Pact, vs.root() / "p", 6);
    let m = Quantizer::new(QuantizerKind::MinMax, vs.root() / "m", 6);
    assert_eq!((p.kind(), m.kind()), (QuantizerKind::Pact, QuantizerKind::MinMax));
    assert_eq!(values(p.alpha().unwrap()), [2.2f32 as f64]);
    assert!(m.alpha().is_none());
    assert_eq!((p.bitwidth(), m.int_max()), (6, 31));
}
