//! [`ProcessGroup`]: PyTorch's Gloo process group (and NCCL for CUDA tensors where built) over
//! a TCPStore rendezvous, with allreduce, broadcast and barrier that give up after the group's
//! timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::{Kind, Tensor};

use super::{CudaBackend, DistEnv};
use crate::glue::distributed::{Group, Reducer, Rendezvous, Store};
use crate::{Error, Result};

/// The longest timeout a group accepts: a lost peer must be noticed in minutes, not in
/// PyTorch's default half hour.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// How [`ProcessGroup::allreduce_`] combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

/// How often each rank bumps its heartbeat counter in the store.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// A Gloo process group of CPU tensors, with NCCL for CUDA tensors where asked for (c10d's
/// own collectives, not the crate's).
pub struct ProcessGroup {
    group: Group,
    cuda: CudaBackend,
    rank: i64,
    world_size: i64,
    timeout: Duration,
    /// The store's address, for messages.
    store_at: String,
    heartbeat: Option<Heartbeat>,
}

/// Each rank's counter `beat/<rank>` in the store, bumped by a thread of its own: when a
/// collective fails, the ranks whose counter stopped are the lost ones.
struct Heartbeat {
    store: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(env: &DistEnv, prefix: &str) -> Option<Self> {
        // A short timeout: the store is read again only when something already failed.
        let store = Store::connect(&env.master_addr, env.master_port, prefix, 2000).ok()?;
        let (store, stop) = (Arc::new(Mutex::new(store)), Arc::new(AtomicBool::new(false)));
        let (s, halt, key) = (Arc::clone(&store), Arc::clone(&stop), beat_key(env.rank));
        let thread = std::thread::Builder::new()
            .name("torchapprox-heartbeat".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    // A store that is gone makes this fail; the reader says so, not this thread.
                    let _ = s.lock().unwrap_or_else(|p| p.into_inner()).add(&key, 1);
                    std::thread::park_timeout(HEARTBEAT);
                }
            })
            .ok()?;
        Some(Self { store, stop, thread: Some(thread) })
    }

    /// The other ranks' counters.
    fn read(&self, rank: i64, world: i64) -> std::result::Result<Vec<(i64, i64)>, String> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        (0..world).filter(|&r| r != rank).map(|r| Ok((r, store.add(&beat_key(r), 0)?))).collect()
    }
}

impl Drop for Heartbeat {
    /// Stops the thread and waits for it, so that no store call of it outlives the group
    /// (or runs while the process exits).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn beat_key(rank: i64) -> String {
    format!("beat/{rank}")
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup {{ rank: {}, world_size: {}, timeout: {:?}, store: {}, cuda: {:?} }}",
            self.rank, self.world_size, self.timeout, self.store_at, self.cuda
        )
    }
}

impl ProcessGroup {
    /// Joins the run `env` describes: rank 0 hosts the TCPStore at `MASTER_ADDR:MASTER_PORT`
    /// (unless torchrun's agent does), every rank connects, and the Gloo group forms. Every
    /// step, and every later collective, gives up after `timeout` (at most [`MAX_TIMEOUT`])
    /// with an error naming this rank and what failed. CUDA tensors go through Gloo.
    pub fn init(env: &DistEnv, timeout: Duration) -> Result<Self> {
        Self::init_with(env, timeout, CudaBackend::Gloo)
    }

    /// [`ProcessGroup::init`] with `cuda` carrying CUDA tensors: NCCL (one GPU per rank) is
    /// refused, before any rendezvous, where this build lacks it or libtorch sees no GPU.
    pub fn init_with(env: &DistEnv, timeout: Duration, cuda: CudaBackend) -> Result<Self> {
        if let Some(why) = cuda.unusable() {
            return Err(Error::Distributed { rank: env.rank, op: "rendezvous", problem: why.to_string() });
        }
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(Error::Argument {
                what: "process group timeout (seconds)",
                value: timeout.as_secs_f64(),
                expected: "more than 0 and at most 600",
            });
        }
        // A second group in one process must not read the first one's keys.
        static GROUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = GROUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("torchapprox/attempt_{}/group_{n}", env.restart);
        // Gloo binds to the address the peers reach: the store's own for a local run.
        let bind_host = if env.master_addr == "localhost" || env.master_addr.starts_with("127.") {
            "127.0.0.1".to_string()
        } else {
            std::env::var("TORCHAPPROX_GLOO_HOST").unwrap_or_else(|_| hostname())
        };
        let r = Rendezvous {
            host: &env.master_addr,
            port: env.master_port,
            rank: env.rank,
            world: env.world_size,
            is_server: env.rank == 0 && !env.agent_store,
            timeout_ms: timeout.as_millis() as i64,
            prefix: &prefix,
            bind_host: &bind_host,
            // One GPU per rank on its machine: LOCAL_RANK's.
            nccl: (cuda == CudaBackend::Nccl).then_some(env.local_rank as i32),
        };
        let group = Group::new(&r).map_err(|problem| Error::Distributed {
            rank: env.rank,
            op: "rendezvous",
            problem: format!(
                "as rank {} of {} at {}:{} within {:?}: {}",
                env.rank,
                env.world_size,
                env.master_addr,
                env.master_port,
                timeout,
                crate::strip_backtrace(&problem)
            ),
        })?;
        let heartbeat = Heartbeat::start(env, &prefix);
        let store_at = format!("{}:{}", env.master_addr, env.master_port);
        Ok(Self { group, cuda, rank: env.rank, world_size: env.world_size, timeout, store_at, heartbeat })
    }

    /// Who is lost, in words: the ranks whose heartbeat stopped over a few beats, or the
    /// store's host where the store no longer answers.
    fn who_is_lost(&self) -> String {
        let Some(h) = &self.heartbeat else {
            return "no heartbeat to tell which rank".into();
        };
        let first = h.read(self.rank, self.world_size);
        std::thread::sleep(HEARTBEAT * 4);
        match (first, h.read(self.rank, self.world_size)) {
            (Ok(a), Ok(b)) => {
                let lost: Vec<String> =
                    a.iter().zip(&b).filter(|(x, y)| x.1 == y.1).map(|(x, _)| x.0.to_string()).collect();
                match lost.len() {
                    0 => "every other rank's heartbeat still beats (one is slow, or cut off from this one)"
                        .into(),
                    1 => format!("rank {} is lost (its heartbeat stopped)", lost[0]),
                    _ => format!("ranks {} are lost (their heartbeats stopped)", lost.join(", ")),
                }
            }
            _ => format!(
                "the store at {} does not answer: its host is lost (rank 0, or torchrun's agent)",
                self.store_at
            ),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> i64 {
        self.rank
    }

    /// How many ranks.
    pub fn world_size(&self) -> i64 {
        self.world_size
    }

    /// The backend of this group's CUDA tensors.
    pub fn cuda_backend(&self) -> CudaBackend {
        self.cuda
    }

    /// Where a collective on a tensor of `device` runs: on that GPU where NCCL serves it,
    /// else on the CPU (Gloo).
    pub fn collective_device(&self, device: tch::Device) -> tch::Device {
        match (device, self.cuda) {
            (tch::Device::Cuda(_), CudaBackend::Nccl) => device,
            _ => tch::Device::Cpu,
        }
    }

    /// c10d's Reducer over `vars` of this group, buckets of about `bucket_bytes`.
    pub(crate) fn reducer(&self, vars: &[Tensor], bucket_bytes: usize, find_unused: bool) -> Result<Reducer> {
        let bytes = i64::try_from(bucket_bytes).unwrap_or(i64::MAX);
        Reducer::new(&self.group, vars, bytes, find_unused).map_err(|p| self.fail("reducer", p))
    }

    /// The error of the collective `op`, saying which peer is lost where c10d reports a lost
    /// or silent one.
    pub(crate) fn fail(&self, op: &'static str, problem: String) -> Error {
        let problem = crate::strip_backtrace(&problem);
        // Say what the message means where c10d reports a lost or silent peer.
        let lost = ["closed", "reset", "timed out", "Timed out", "timeout", "Broken pipe"]
            .iter()
            .any(|w| problem.contains(w));
        let problem = if lost {
            format!(
                "a peer is gone or did not answer within {:?}: {}; {problem}",
                self.timeout,
                self.who_is_lost()
            )
        } else {
            problem
        };
        Error::Distributed { rank: self.rank, op, problem }
    }

    /// Refuses a tensor this group's collectives cannot take: CPU tensors (Gloo), CUDA ones
    /// where NCCL serves them, contiguous either way.
    fn check_tensor(&self, t: &Tensor, op: &'static str) -> Result<()> {
        if self.collective_device(t.device()) != t.device() || !t.is_contiguous() {
            let takes = match self.cuda {
                CudaBackend::Nccl => "contiguous CPU or CUDA tensors",
                CudaBackend::Gloo => "contiguous CPU tensors",
            };
            return Err(Error::Distributed {
                rank: self.rank,
                op,
                problem: format!(
                    "this group takes {takes}, got a{} tensor on {:?}",
                    if t.is_contiguous() { "" } else { " non-contiguous" },
                    t.device()
                ),
            });
        }
        Ok(())
    }

    /// Combines `t` over all ranks, in place: every rank ends with the same values.
    pub fn allreduce_(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check_tensor(t, "allreduce")?;
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        self.group.allreduce(t, code).map_err(|p| self.fail("allreduce", p))
    }

    /// Copies rank `root`'s `t` into every rank's `t`.
    pub fn broadcast_(&mut self, t: &mut Tensor, root: i64) -> Result<()> {
        self.check_tensor(t, "broadcast")?;
        self.group.broadcast(t, root).map_err(|p| self.fail("broadcast", p))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.group.barrier().map_err(|p| self.fail("barrier", p))
    }

    /// Refuses to go on unless every rank passed the same `value` (a hash of its
    /// configuration, its parameter shapes): the error names `what` and this rank's value.
    pub fn check_same(&mut self, what: &str, value: u64) -> Result<()> {
        // Two 32-bit halves: float-free and exact in int64 max and min.
        let halves = [(value >> 32) as i64, (value & 0xffff_ffff) as i64];
        let mut hi = Tensor::f_from_slice(&halves)?.f_to_kind(Kind::Int64)?;
        let mut lo = Tensor::f_from_slice(&halves)?;
        self.allreduce_(&mut hi, ReduceOp::Max)?;
        self.allreduce_(&mut lo, ReduceOp::Min)?;
        if !hi.equal(&lo) {
            return Err(Error::Distributed {
                rank: self.rank,
                op: "start",
                problem: format!("the ranks disagree on {what} (this rank's is {value:016x})"),
            });
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}
