//! The reference networks of the trainer, with PyTorch's layer names: an MLP and LeNet-5.

use std::fmt;
use std::str::FromStr;

use tch::{nn, Tensor};

use crate::layers::{
    approx_sequential, ApproxConvConfig, ApproxLayer, ApproxLinearConfig, ApproxModule, ApproxSequential,
    QuantSpec,
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
            _ => Err(Error::Unknown { what: "model", name: s.to_string(), expected: "`mlp` or `lenet`" }),
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
        let lin = |name: &str| ApproxLinearConfig { quant: spec_for(name), ..Default::default() };
        let conv =
            |name: &str, padding| ApproxConvConfig { padding, quant: spec_for(name), ..Default::default() };
        let seq = approx_sequential(path);
        let seq = match self {
            Self::Mlp => {
                seq.flatten().linear("fc1", 784, 256, lin("fc1")).relu().linear("fc2", 256, 10, lin("fc2"))
            }
            Self::LeNet5 => seq
                .conv2d("conv1", 1, 6, 5, conv("conv1", 2))
                .relu()
                .max_pool2d(2)
                .conv2d("conv2", 6, 16, 5, conv("conv2", 0))
                .relu()
                .max_pool2d(2)
                .flatten()
                .linear("fc1", 400, 120, lin("fc1"))
                .relu()
                .linear("fc2", 120, 84, lin("fc2"))
                .relu()
                .linear("fc3", 84, 10, lin("fc3")),
        };
        Ok(Net { arch: self, seq: seq.build().map_err(unnamed)? })
    }
}

/// A construction error without the layer-name wrapper: the reference networks' layer
/// names are fixed, so the configuration is what went wrong.
fn unnamed(e: Error) -> Error {
    match e {
        Error::In { error, .. } => *error,
        e => e,
    }
}

/// A reference network built by [`Architecture::build`]: an [`ApproxSequential`] that
/// checks its input is `[N, 1, 28, 28]`.
#[derive(Debug)]
pub struct Net {
    arch: Architecture,
    seq: ApproxSequential,
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
        self.seq.f_forward_t(xs, train)
    }

    /// [`ApproxModule::calibrate`] with the network's own forward pass (see
    /// [`ApproxSequential::calibrate_on`]).
    pub fn calibrate_on(
        &self,
        batches: &[Tensor],
        method: crate::layers::Calibration,
    ) -> Result<Vec<(String, f64)>> {
        self.calibrate(batches, &|x| self.f_forward_t(x, false), method)
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
        self.seq.approx_layers()
    }
}
