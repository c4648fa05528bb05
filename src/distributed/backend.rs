//! [`CudaBackend`]: which c10d backend carries a group's CUDA tensors (Gloo, or NVIDIA's NCCL
//! where the crate's `nccl` feature built it).

use std::str::FromStr;

use crate::{Error, Result};

/// Whether this build has NCCL groups: the crate's `nccl` feature, compiled where CUDA's and
/// NCCL's headers were found.
pub const NCCL_BUILT: bool = cfg!(torchapprox_nccl);

/// Which c10d backend carries a group's CUDA tensors; CPU tensors always go through Gloo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaBackend {
    /// Gloo: the crate's collectives sum CUDA gradients through host copies.
    #[default]
    Gloo,
    /// NVIDIA's NCCL, on the GPUs themselves (one GPU per rank): needs [`NCCL_BUILT`].
    Nccl,
}

impl CudaBackend {
    /// The backend PyTorch users pick for `device`: NCCL for CUDA where this build has it,
    /// else Gloo.
    pub fn for_device(device: tch::Device) -> Self {
        if device.is_cuda() && NCCL_BUILT {
            Self::Nccl
        } else {
            Self::Gloo
        }
    }

    /// Why this backend cannot serve here, if it cannot: NCCL needs the `nccl` feature and a
    /// CUDA device.
    pub(crate) fn unusable(self) -> Option<&'static str> {
        match self {
            Self::Gloo => None,
            Self::Nccl if !NCCL_BUILT => Some(
                "NCCL is not in this build of torchapprox: build it with the `nccl` feature where \
                 CUDA's and NCCL's headers are (scripts/setup.sh installs them into the venv)",
            ),
            Self::Nccl if !crate::cuda::is_available() => {
                Some("NCCL carries CUDA tensors, and libtorch sees no CUDA device here")
            }
            Self::Nccl => None,
        }
    }
}

impl FromStr for CudaBackend {
    type Err = Error;

    /// `gloo` or `nccl`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gloo" => Ok(Self::Gloo),
            "nccl" => Ok(Self::Nccl),
            _ => Err(Error::Unknown {
                what: "process group backend",
                name: s.to_string(),
                expected: "gloo or nccl",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_defaults() {
        assert_eq!("gloo".parse::<CudaBackend>().unwrap(), CudaBackend::Gloo);
        assert_eq!("nccl".parse::<CudaBackend>().unwrap(), CudaBackend::Nccl);
        let e = "mpi".parse::<CudaBackend>().unwrap_err().to_string();
        assert_eq!(e, "unknown process group backend \"mpi\": expected gloo or nccl");
        assert_eq!(CudaBackend::for_device(tch::Device::Cpu), CudaBackend::Gloo);
        assert_eq!(CudaBackend::for_device(tch::Device::Cuda(0)) == CudaBackend::Nccl, NCCL_BUILT);
        assert_eq!(CudaBackend::Gloo.unusable(), None);
    }
}
