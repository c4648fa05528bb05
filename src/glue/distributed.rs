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
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn ta_pg_allreduce(g: *mut c_void, t: *mut super::CTensor, op: i32) -> *mut c_char;
    fn ta_pg_broadcast(g: *mut c_void, t: *mut super::CTensor, root: i64) -> *mut c_char;
    fn ta_pg_barrier(g: *mut c_void) -> *mut c_char;
    fn ta_pg_free(g: *mut c_void);
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
