//! libtorch's CUDA library in a Rust test binary: loaded before `main` where NVIDIA's driver
//! is (the linker leaves it out, and libtorch's first CUDA query fixes whether CUDA exists),
//! loaded on request otherwise, and CUDA seen exactly where a driver and a device are.

use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};

fn mapped() -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().contains("/libtorch_cuda.so")
}

fn libtorch_has_cuda() -> bool {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch/lib/libtorch_cuda.so").exists()
}

#[test]
fn cuda_backend_loads_where_libtorch_has_it() {
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let has = libtorch_has_cuda();
    // (A build with the nccl feature names libtorch_cuda's symbols, so it is always loaded.)
    if std::env::var_os("TORCHAPPROX_CUDA").is_none() && !torchapprox::distributed::NCCL_BUILT {
        // Loaded before main exactly where the driver is.
        assert_eq!(mapped(), has && torchapprox::cuda::driver_present());
    }
    assert_eq!(torchapprox::cuda::f_load_backend().unwrap(), has);
    assert_eq!(mapped(), has);
    // A second call finds it loaded.
    assert_eq!(torchapprox::cuda::f_load_backend().unwrap(), has);
    let available = torchapprox::cuda::f_is_available().unwrap();
    assert_eq!(available, torchapprox::cuda::driver_present() && tch::Cuda::device_count() > 0);
    assert_eq!(torchapprox::cuda::cuda_if_available() == Device::Cuda(0), available);
    if available {
        let t = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 4.0);
    }
    if !has {
        return;
    }
    // The worker below, in a process of its own with TORCHAPPROX_CUDA set to `value`.
    let worker = |value: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "device::cuda_loaded_before_main",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("TORCHAPPROX_CUDA", value)
            .output()
            .unwrap()
    };
    // The load before main registers libtorch's CUDA backend for good: in a process started
    // with TORCHAPPROX_CUDA=always, after a manual_seed (libtorch's first CUDA query), a CUDA
    // tensor fails for want of a driver, not of the backend.
    let o = worker("always");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("mapped at start: true"), "{out}");
    assert!(out.contains("cuda tensor: ok") || out.contains("cuda tensor: no device"), "{out}");
    // A value it does not know: one warning line (before main, nobody to return an error to),
    // then the default, and the program runs on.
    let o = worker("yes\u{1b}");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}{err}");
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("TORCHAPPROX_CUDA")).collect();
    assert_eq!(
        warned,
        ["warning: TORCHAPPROX_CUDA=\"yes\\u{1b}\": expected always, never or auto; taken as auto"],
        "{err}"
    );
    let driver = torchapprox::cuda::driver_present();
    assert!(
        out.contains(&format!("mapped at start: {driver}")) || torchapprox::distributed::NCCL_BUILT,
        "{out}"
    );
}

/// The worker of the test above (run by it, in a process of its own).
#[test]
#[ignore]
fn cuda_loaded_before_main() {
    println!("mapped at start: {}", mapped());
    tch::manual_seed(1);
    match Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))) {
        Ok(_) => println!("cuda tensor: ok"),
        // The registered backend's own complaint; without it, "Could not run
        // 'aten::empty.memory_format' with arguments from the 'CUDA' backend".
        Err(e) if e.to_string().contains("Found no NVIDIA driver") => println!("cuda tensor: no device"),
        Err(e) => println!("cuda tensor: backend missing: {e}"),
    }
}
