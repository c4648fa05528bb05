//! c10d through `distributed.cpp`: a TCPStore rendezvous and a Gloo process group, and its
//! collectives. Built only where gloo's headers were found (cfg `torchapprox_gloo`).

use std::ffi::{c_char, c_void, CString};

use tch::Tensor;

use super::check;

#[cfg(torchapprox_gloo)]
extern "C" {
    fn ta_pg_new(
        host: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        is_server: i32,
        timeout_ms: i64,
        prefix: *const c_char,
        bind_host: *const c_char,
        nccl: i32,
        nccl_device: i32,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ta_pg_allreduce(g: *mut c_void, t: *mut super::CTensor, op: i32) -> *mut c_char;
    fn ta_pg_broadcast(g: *mut c_void, t: *mut super::CTensor, root: i64) -> *mut c_char;
    fn ta_pg_barrier(g: *mut c_void) -> *mut c_char;
    fn ta_pg_free(g: *mut c_void);
    fn ta_reducer_new(
        g: *mut c_void,
        vars: *const *mut super::CTensor,
        n: i32,
        bucket_bytes: i64,
        find_unused: i32,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ta_reducer_prepare(r: *mut c_void, outputs: *const *mut super::CTensor, n: i32) -> *mut c_char;
    fn ta_reducer_free(r: *mut c_void) -> *mut c_char;
    fn ta_store_connect(
        host: *const c_char,
        port: i32,
        prefix: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ta_store_add(s: *mut c_void, key: *const c_char, delta: i64, out: *mut i64) -> *mut c_char;
    fn ta_store_free(s: *mut c_void);
}

/// A TCPStore client of the glue (its own connection, apart from any group's).
pub(crate) struct Store(*mut c_void);

// SAFETY: c10d's store clients may move between threads; callers serialize their use.
unsafe impl Send for Store {}

impl Store {
    /// Connects to the store at `host:port`, keys under `prefix`; operations give up after `timeout_ms`.
    #[cfg(torchapprox_gloo)]
    pub(crate) fn connect(
        host: &str,
        port: u16,
        prefix: &str,
        timeout_ms: i64,
    ) -> std::result::Result<Self, String> {
        let (host, prefix) = (cstr(host)?, cstr(prefix)?);
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid strings for the call; `out` receives the client on success.
        check(unsafe {
            ta_store_connect(host.as_ptr(), i32::from(port), prefix.as_ptr(), timeout_ms, &mut out)
        })?;
        if out.is_null() {
            return Err("the glue returned no store".into());
        }
        Ok(Self(out))
    }

    #[cfg(not(torchapprox_gloo))]
    pub(crate) fn connect(_: &str, _: u16, _: &str, _: i64) -> std::result::Result<Self, String> {
        Err("this build has no c10d stores".into())
    }

    /// Adds `delta` to the counter `key` and returns its value (0: a read that never waits).
    pub(crate) fn add(&mut self, key: &str, delta: i64) -> std::result::Result<i64, String> {
        let key = cstr(key)?;
        let mut out = 0i64;
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live client and string for the call.
        check(unsafe { ta_store_add(self.0, key.as_ptr(), delta, &mut out) })?;
        #[cfg(not(torchapprox_gloo))]
        let _ = (key, delta);
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        #[cfg(torchapprox_gloo)]
        // SAFETY: the client came from ta_store_connect and is freed once.
        unsafe {
            ta_store_free(self.0)
        };
    }
}

/// A Gloo process group owned by the glue.
pub(crate) struct Group(*mut c_void);

// SAFETY: the glue's group is used by one caller at a time (`&mut self` on every collective
// in `distributed::ProcessGroup`), and c10d groups may move between threads.
unsafe impl Send for Group {}

fn cstr(s: &str) -> std::result::Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"))
}

/// What the rendezvous needs: the store's address, this rank, the world, who hosts the store.
pub(crate) struct Rendezvous<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: i64,
    pub world: i64,
    pub is_server: bool,
    pub timeout_ms: i64,
    pub prefix: &'a str,
    pub bind_host: &'a str,
    /// An NCCL group beside the Gloo one, for CUDA tensors, on this GPU.
    pub nccl: Option<i32>,
}

impl Group {
    #[cfg(torchapprox_gloo)]
    pub(crate) fn new(r: &Rendezvous<'_>) -> std::result::Result<Self, String> {
        let (host, prefix, bind) = (cstr(r.host)?, cstr(r.prefix)?, cstr(r.bind_host)?);
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid strings for the call; `out` receives the group on success.
        check(unsafe {
            ta_pg_new(
                host.as_ptr(),
                i32::from(r.port),
                r.rank as i32,
                r.world as i32,
                r.is_server as i32,
                r.timeout_ms,
                prefix.as_ptr(),
                bind.as_ptr(),
                r.nccl.is_some() as i32,
                r.nccl.unwrap_or(0),
                &mut out,
            )
        })?;
        if out.is_null() {
            return Err("the glue returned no process group".into());
        }
        Ok(Self(out))
    }

    #[cfg(not(torchapprox_gloo))]
    pub(crate) fn new(_: &Rendezvous<'_>) -> std::result::Result<Self, String> {
        Err("this build has no Gloo process groups: gloo's headers were missing when it was compiled \
             (install libgloo-dev, e.g. with scripts/setup.sh, then rebuild)"
            .into())
    }

    /// Reduces `t` in place over all ranks: 0 sum, 1 max, 2 min.
    pub(crate) fn allreduce(&mut self, t: &mut Tensor, op: i32) -> std::result::Result<(), String> {
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live group and tensor for the call.
        return check(unsafe { ta_pg_allreduce(self.0, t.as_mut_ptr(), op) });
        #[cfg(not(torchapprox_gloo))]
        return Err(format!("no group ({t:?}, {op})"));
    }

    /// Copies rank `root`'s `t` into every rank's.
    pub(crate) fn broadcast(&mut self, t: &mut Tensor, root: i64) -> std::result::Result<(), String> {
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live group and tensor for the call.
        return check(unsafe { ta_pg_broadcast(self.0, t.as_mut_ptr(), root) });
        #[cfg(not(torchapprox_gloo))]
        return Err(format!("no group ({t:?}, {root})"));
    }

    /// Waits for every rank.
    pub(crate) fn barrier(&mut self) -> std::result::Result<(), String> {
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live group.
        return check(unsafe { ta_pg_barrier(self.0) });
        #[cfg(not(torchapprox_gloo))]
        return Err("no group".into());
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(torchapprox_gloo)]
        // SAFETY: the group came from ta_pg_new and is freed once.
        unsafe {
            ta_pg_free(self.0)
        };
    }
}

/// c10d's `Reducer` (the engine of PyTorch's DistributedDataParallel) over some variables of a
/// group: autograd hooks that average buckets of gradients over the ranks during the
/// backward pass. It holds its own reference to the group.
pub(crate) struct Reducer(*mut c_void);

impl std::fmt::Debug for Reducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reducer")
    }
}

// SAFETY: the reducer is armed and dropped by one owner at a time (`&mut self`); its hooks
// run on libtorch's autograd threads, as in PyTorch.
unsafe impl Send for Reducer {}

impl Reducer {
    /// Hooks on `vars` (trainable leaves, in the same order on every rank), buckets of about
    /// `bucket_bytes`; `find_unused` searches each pass's graph for variables it never reaches.
    pub(crate) fn new(
        group: &Group,
        vars: &[Tensor],
        bucket_bytes: i64,
        find_unused: bool,
    ) -> std::result::Result<Self, String> {
        let ptrs: Vec<*mut super::CTensor> = vars.iter().map(|t| t.as_ptr() as *mut _).collect();
        let n = i32::try_from(ptrs.len()).map_err(|_| format!("{} variables", ptrs.len()))?;
        let mut out: *mut c_void = std::ptr::null_mut();
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live group and `n` tensors for the call; `out` receives the reducer.
        check(unsafe {
            ta_reducer_new(group.0, ptrs.as_ptr(), n, bucket_bytes, find_unused as i32, &mut out)
        })?;
        #[cfg(not(torchapprox_gloo))]
        let _ = (group, n, bucket_bytes, find_unused);
        if out.is_null() {
            return Err("the glue returned no reducer".into());
        }
        Ok(Self(out))
    }

    /// Arms the hooks for the next backward pass from `outputs`.
    pub(crate) fn prepare(&mut self, outputs: &[&Tensor]) -> std::result::Result<(), String> {
        let ptrs: Vec<*mut super::CTensor> = outputs.iter().map(|t| t.as_ptr() as *mut _).collect();
        #[cfg(torchapprox_gloo)]
        // SAFETY: a live reducer and tensors for the call.
        return check(unsafe { ta_reducer_prepare(self.0, ptrs.as_ptr(), ptrs.len() as i32) });
        #[cfg(not(torchapprox_gloo))]
        return Err(format!("no reducer ({} outputs)", ptrs.len()));
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        #[cfg(torchapprox_gloo)]
        // SAFETY: the reducer came from ta_reducer_new and is freed once; an exception of its
        // destructor (after a failed pass) is caught by the glue and its text dropped here.
        let _ = check(unsafe { ta_reducer_free(self.0) });
    }
}
