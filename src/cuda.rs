//! CUDA for Rust programs on libtorch: loads libtorch's CUDA library, which the linker drops
//! from binaries that call none of its functions (tch-rs issue 980), so that libtorch sees
//! the machine's GPUs.
//!
//! PyTorch keeps its CUDA kernels in `libtorch_cuda.so` and registers them when that library
//! is loaded. A Rust binary names no symbol of it, so `--as-needed` linking leaves it out and
//! `tch::Cuda::is_available()` says `false` on a machine with GPUs. Python's `import torch`
//! loads it explicitly. This module loads it before `main` (and before any test) wherever
//! NVIDIA's driver is present: libtorch decides once, at its first CUDA query (which any
//! `tch::manual_seed` makes), whether CUDA exists, so a later load is too late. CPU-only
//! machines do not pay its start-up (about 0.2 s and 350 MB), except in builds with the
//! `nccl` feature, which name its symbols and so link it. `TORCHAPPROX_CUDA=always` loads it
//! without a driver too, `never` not at all, `auto` (the default) as above.
//!
//! ```
//! // `false` on a machine without a GPU; on one with a GPU, CUDA tensors work afterwards.
//! let device = torchapprox::cuda::cuda_if_available();
//! assert_eq!(device.is_cuda(), torchapprox::cuda::is_available());
//! ```

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tch::Device;

use crate::{Error, Result};

/// The library that holds libtorch's CUDA kernels; CPU-only builds of libtorch lack it.
const CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// The library of libtorch that every tch program loads: the CUDA library sits beside it.
const CPU_LIBRARY: &str = "libtorch_cpu.so";

/// NVIDIA's driver library: without it no CUDA device can exist.
const DRIVER: &str = "libcuda.so.1";

/// Whether NVIDIA's driver library loads on this machine (a GPU may then be present).
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        let name = CString::new(DRIVER).expect("no NUL in a constant");
        // SAFETY: a valid C string; the handle stays open (libtorch loads the driver anyway).
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null()
    })
}

// Before `main`, as a C constructor: the load must precede libtorch's first CUDA query.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static LOAD_AT_START: extern "C" fn() = load_at_start;

/// Loads libtorch's CUDA library where NVIDIA's driver is present (or `TORCHAPPROX_CUDA`
/// says `always`); a failure is left for [`f_is_available`] to report.
extern "C" fn load_at_start() {
    let load = match std::env::var_os("TORCHAPPROX_CUDA") {
        None => driver_present(),
        Some(v) if v == "always" => true,
        Some(v) if v == "never" => false,
        Some(v) if v == "auto" => driver_present(),
        Some(v) => {
            // Before main there is no caller to return an error to: one line, then the default.
            eprintln!("warning: TORCHAPPROX_CUDA={v:?}: expected always, never or auto; taken as auto");
            driver_present()
        }
    };
    if load {
        let _ = f_load_backend();
    }
}

/// Loads libtorch's CUDA library (once; later calls return at once) and says whether it is
/// loaded: `Ok(false)` where libtorch is a CPU-only build. Loading it registers libtorch's
/// CUDA backend, and needs no GPU; libtorch sees that backend only if it is loaded before
/// libtorch's first CUDA query, which is why this crate loads it before `main`.
pub fn f_load_backend() -> Result<bool> {
    // One loader at a time: two threads must not both dlopen and race on the outcome.
    static LOCK: Mutex<()> = Mutex::new(());
    let _once = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if loaded(CUDA_LIBRARY) {
        return Ok(true);
    }
    let Some(folder) = library_folder(CPU_LIBRARY) else {
        return Ok(false);
    };
    let path = folder.join(CUDA_LIBRARY);
    if !path.exists() {
        return Ok(false);
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::CudaLibrary {
        path: path.clone(),
        problem: "the path holds a NUL byte".into(),
    })?;
    // SAFETY: a valid C string. RTLD_GLOBAL, as Python's import of torch: the library's
    // kernels register themselves with libtorch when it loads.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(Error::CudaLibrary { path, problem: dl_error() });
    }
    Ok(true)
}

/// [`f_load_backend`], with a failure reported as `false`.
pub fn load_backend() -> bool {
    f_load_backend().unwrap_or(false)
}

/// Whether libtorch can use a CUDA device here: the driver is present, libtorch's CUDA
/// library loads, and libtorch counts at least one device. An error only where the driver is
/// present but the CUDA library does not load.
pub fn f_is_available() -> Result<bool> {
    if !driver_present() {
        return Ok(false);
    }
    Ok(f_load_backend()? && tch::Cuda::is_available())
}

/// [`f_is_available`], with a failure reported as `false`: use it where tch's
/// `tch::Cuda::is_available()` would be used.
pub fn is_available() -> bool {
    f_is_available().unwrap_or(false)
}

/// The first CUDA device where [`is_available`], else the CPU: tch's
/// `Device::cuda_if_available()`, which also sees GPUs in Rust binaries.
pub fn cuda_if_available() -> Device {
    if is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// Whether a library of this file name is loaded in this process.
fn loaded(name: &str) -> bool {
    let c = CString::new(name).expect("no NUL in a constant");
    // SAFETY: a valid C string; RTLD_NOLOAD only looks the library up. The extra reference
    // it takes is never dropped, which keeps a loaded library loaded.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) }.is_null()
}

/// The folder of the loaded library `name`, from the process's memory map.
fn library_folder(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    // Address, permissions, offset, device, inode, then the path (which may hold spaces).
    maps.lines()
        .filter_map(|l| {
            l.split_whitespace().nth(5).and_then(|first| l.find(first).map(|at| l[at..].trim_end()))
        })
        .map(Path::new)
        .find(|p| p.file_name().is_some_and(|f| f == name))
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The dynamic loader's last message.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a C string valid until the next dl call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "the dynamic loader gave no reason".into()
    } else {
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_cpu_is_found_in_the_memory_map() {
        // Any tensor operation has loaded libtorch_cpu by now.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        let folder = library_folder(CPU_LIBRARY).expect("libtorch_cpu.so is mapped");
        assert!(folder.join(CPU_LIBRARY).exists(), "{}", folder.display());
        assert!(library_folder("no-such-library.so").is_none());
    }
}
