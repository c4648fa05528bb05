//! The reference networks of the trainer, with PyTorch's layer names: an MLP and LeNet-5.

use std::fmt;
use std::str::FromStr;

use tch::{nn, Tensor};

use crate::layers::{
    ApproxConv2d, ApproxConvConfig, ApproxLayer, ApproxLinear, ApproxLinearConfig, ApproxModule, QuantSpec,
};
use crate::{Error, Result};

/// Which reference network to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `fc1` 784→256, ReLU, `fc2` 256→10.
    Mlp,
    /// LeNet-5: `conv1` 1→6 5x5 pad 2, ReLU, max-pool 2, `conv2` 6→16 5x5, ReLU,
    /// max-pool 2, `fc1` 400→120, ReLU, `fc2` 120→84, ReLU, `fc3` 84→10.
    LeNet5,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Mlp => "mlp",
            Self::LeNet5 => "lenet",
        })
    }
}

impl FromStr for Architecture {
    type Err = Error;

    /// Accepts `mlp` and `lenet` (or `lenet5`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mlp" => Ok(Self::Mlp),
            "lenet" | "lenet5" | "lenet-5" => Ok(Self::LeNet5),
            _ => Err(Error::UnknownModel(s.to_string())),
        }
    }
}

impl Architecture {
    /// The names of the network's Approx layers, in order.
    pub fn layer_names(self) -> &'static [&'static str] {
        match self {
            Self::Mlp => &["fc1", "fc2"],
            Self::LeNet5 => &["conv1", "conv2", "fc1", "fc2", "fc3"],
        }
    }

    /// Builds the network under `path`; `spec_for(name)` gives each layer's quantization.
    pub fn build(self, path: &nn::Path, spec_for: impl Fn(&str) -> QuantSpec) -> Result<Net> {
        let lin = |name: &str, i, o| {
            let config = ApproxLinearConfig { quant: spec_for(name), ..Default::default() };
            ApproxLinear::f_new(path / name, i, o, config)
        };
        let conv = |name: &str, i, o, padding| {
            let config = ApproxConvConfig { padding, quant: spec_for(name), ..Default::default() };
            ApproxConv2d::f_new(path / name, i, o, 5, config)
        };
        let layers = match self {
            Self::Mlp => vec![Layer::Linear(lin("fc1", 784, 256)?), Layer::Linear(lin("fc2", 256, 10)?)],
            Self::LeNet5 => vec![
                Layer::Conv(conv("conv1", 1, 6, 2)?),
                Layer::Conv(conv("conv2", 6, 16, 0)?),
                Layer::Linear(lin("fc1", 400, 120)?),
                Layer::Linear(lin("fc2", 120, 84)?),
                Layer::Linear(lin("fc3", 84, 10)?),
            ],
        };
        Ok(Net { arch: self, layers })
    }
}

#[derive(Debug)]
enum Layer {
    Linear(ApproxLinear),
    Conv(ApproxConv2d),
}

impl Layer {
    fn as_approx(&self) -> &dyn ApproxLayer {
        match self {
            Self::Linear(l) => l,
            Self::Conv(c) => c,
        }
    }

    fn f_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Linear(l) => l.f_forward_t(x, train),
            Self::Conv(c) => c.f_forward_t(x, train),
        }
    }
}

/// A reference network built by [`Architecture::build`].
#[derive(Debug)]
pub struct Net {
    arch: Architecture,
    layers: Vec<Layer>,
}

impl Net {
    /// Which architecture this is.
    pub fn architecture(&self) -> Architecture {
        self.arch
    }

    /// The forward pass, returning errors (such as a wrong input shape) instead of panicking.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        crate::quantizers::check_defined(xs, "network input")?;
        let size = xs.size();
        if size.len() != 4 || size[1..] != [1, 28, 28] {
            return Err(Error::Shape {
                what: format!("{} input", self.arch),
                expected: "[N, 1, 28, 28]".into(),
                actual: size,
            });
        }
        let l = &self.layers;
        match self.arch {
            Architecture::Mlp => {
                let h = l[0].f_forward_t(&xs.f_flatten(1, -1)?, train)?.f_relu()?;
                l[1].f_forward_t(&h, train)
            }
            Architecture::LeNet5 => {
                let pool = |t: Tensor| t.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
                let h = pool(l[0].f_forward_t(xs, train)?)?;
                let h = pool(l[1].f_forward_t(&h, train)?)?;
                let h = l[2].f_forward_t(&h.f_flatten(1, -1)?, train)?.f_relu()?;
                let h = l[3].f_forward_t(&h, train)?.f_relu()?;
                l[4].f_forward_t(&h, train)
            }
        }
    }
}

impl nn::ModuleT for Net {
    /// Logits of the ten digit classes.
    ///
    /// # Shapes
    /// - `xs`: `[N, 1, 28, 28]`, normalised images
    /// - output: `[N, 10]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl ApproxModule for Net {
    fn approx_layers(&self) -> Vec<(String, &dyn ApproxLayer)> {
        self.arch
            .layer_names()
            .iter()
            .zip(&self.layers)
            .map(|(n, l)| (n.to_string(), l.as_approx()))
            .collect()
    }
}
