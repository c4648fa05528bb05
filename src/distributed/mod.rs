//! Several processes, one training run, through PyTorch's own c10d: torchrun's environment
//! ([`DistEnv`]) and a Gloo [`ProcessGroup`], with NCCL for CUDA tensors where built
//! ([`CudaBackend`]; TCPStore rendezvous; allreduce, broadcast, barrier) whose every step
//! gives up after a timeout, so a lost peer ends the run in minutes with one line naming the
//! rank and the step; [`DataParallel`] trains one network
//! on every rank with a share of each batch, as one process would on the whole batch, its
//! gradient sums overlapped with the backward pass by c10d's `Reducer` (the engine of
//! PyTorch's DistributedDataParallel).
//!
//! ```no_run
//! use std::time::Duration;
//! use tch::Tensor;
//! use torchapprox::distributed::{DistEnv, ProcessGroup, ReduceOp};
//!
//! // Under `torchrun --nproc-per-node 2 ...`, or with RANK, WORLD_SIZE, MASTER_PORT set.
//! if let Some(env) = DistEnv::from_env()? {
//!     let mut group = ProcessGroup::init(&env, Duration::from_secs(60))?;
//!     let mut t = Tensor::from_slice(&[env.rank as f32 + 1.0]);
//!     group.allreduce_(&mut t, ReduceOp::Sum)?; // 1 + 2 = 3 on both ranks
//! }
//! # Ok::<(), torchapprox::Error>(())
//! ```

mod backend;
mod data_parallel;
mod env;
mod group;

pub use backend::{CudaBackend, NCCL_BUILT};
pub use data_parallel::{DataParallel, DEFAULT_BUCKET_BYTES};
pub use env::DistEnv;
pub use group::{ProcessGroup, ReduceOp, MAX_TIMEOUT};
