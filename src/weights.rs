//! Where weights come from: one interface ([`WeightSource`]) for safetensors state dicts,
//! TorchScript models, `VarStore`s and plain lists of named tensors, which the import consumes.

use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

use crate::Result;

/// Named tensors from somewhere (a file, a model, a store), as PyTorch's `state_dict()` lists them.
///
/// ```
/// use tch::{nn, Device, Tensor};
/// use torchapprox::weights::{NamedTensors, WeightSource};
///
/// let source = NamedTensors::new("made here", vec![("fc.bias".to_string(), Tensor::zeros([3], (tch::Kind::Float, Device::Cpu)))]);
/// assert_eq!(source.names()?, ["fc.bias"]);
/// assert_eq!(source.shapes()?, [("fc.bias".to_string(), vec![3])]);
/// # Ok::<(), torchapprox::Error>(())
/// ```
pub trait WeightSource {
    /// What the tensors are called in messages (a file path, a model).
    fn origin(&self) -> String;

    /// Every tensor with its name, in the source's order.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Every name, in the source's order.
    fn names(&self) -> Result<Vec<String>> {
        Ok(self.tensors()?.into_iter().map(|(n, _)| n).collect())
    }

    /// Every name with its shape.
    fn shapes(&self) -> Result<Vec<(String, Vec<i64>)>> {
        Ok(self.tensors()?.into_iter().map(|(n, t)| (n, t.size())).collect())
    }
}

/// A `.safetensors` file, read with [`files::read_safetensors`](crate::files::read_safetensors)
/// (its header checked before any payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsFile(pub PathBuf);

impl SafetensorsFile {
    /// The file at `path`; nothing is read until [`WeightSource::tensors`].
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self(path.as_ref().to_path_buf())
    }
}

impl WeightSource for SafetensorsFile {
    fn origin(&self) -> String {
        crate::files::shown_path(&self.0)
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        crate::files::read_safetensors(&self.0)
    }
}

/// A list of named tensors with a name for messages.
#[derive(Debug)]
pub struct NamedTensors {
    origin: String,
    tensors: Vec<(String, Tensor)>,
}

impl NamedTensors {
    /// `tensors`, called `origin` in messages.
    pub fn new(origin: impl Into<String>, tensors: Vec<(String, Tensor)>) -> Self {
        Self { origin: origin.into(), tensors }
    }
}

impl WeightSource for NamedTensors {
    fn origin(&self) -> String {
        self.origin.clone()
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect())
    }
}

/// A network's own variables (sharing storage), for example to copy one network into another.
impl WeightSource for nn::VarStore {
    fn origin(&self) -> String {
        "a VarStore".to_string()
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}

/// A TorchScript model's parameters and buffers, as its `state_dict()` lists them.
impl WeightSource for crate::torchscript::ScriptModel {
    fn origin(&self) -> String {
        crate::files::shown_path(self.source())
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.state_dict()
    }
}
