//! A user's program: a quantized layer trained one step, through the crate's native autograd nodes.

use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use torchapprox::layers::{approx_linear, ApproxLayer, InferenceMode, QuantSpec};
use torchapprox::quantizers::ApproxQuantizer;

fn main() {
    // Whether the crate loaded libtorch's CUDA library before main (where a driver is, or
    // TORCHAPPROX_CUDA=always): its constructor must survive into a user's binary.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    println!("cuda backend loaded at start: {}", maps.contains("/libtorch_cuda.so"));
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = QuantSpec { mode: InferenceMode::Quantized, ..Default::default() };
    let fc = approx_linear(vs.root() / "fc", 4, 2, torchapprox::layers::ApproxLinearConfig { bias: true, quant: spec });
    let mut opt = nn::Adam::default().build(&vs, 0.1).unwrap();
    let x = Tensor::from_slice(&[3.0f32, -0.5, 0.25, 1.0, -2.5, 0.75, 2.9, -0.1]).reshape([2, 4]);
    let loss = fc.forward_t(&x, true).square().sum(Kind::Float);
    opt.backward_step(&loss);
    let alpha = vs.variables()["fc.x_quantizer.alpha"].double_value(&[0]);
    println!("downstream ok: loss {:.4}, alpha {alpha:.4}, int_max {}", loss.double_value(&[]), fc.quant().x_quantizer().int_max());
}
