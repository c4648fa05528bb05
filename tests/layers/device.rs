//! libtorch's CUDA library in a Rust test binary: loaded where libtorch has it (the linker
//! leaves it out), and CUDA seen exactly where a driver and a device are.

use std::path::Path;

use tch::{Device, Kind, Tensor};

#[test]
fn cuda_backend_loads_where_libtorch_has_it() {
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();
    let has = Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch/lib/libtorch_cuda.so").exists();
    if !torchapprox::cuda::driver_present() {
        // Nothing else loads it without a driver (on a GPU machine other tests may have).
        assert!(
            !maps().contains("/libtorch_cuda.so"),
            "the linker kept libtorch_cuda.so: this loader is moot"
        );
    }
    assert_eq!(torchapprox::cuda::f_load_backend().unwrap(), has);
    assert_eq!(maps().contains("/libtorch_cuda.so"), has);
    // A second call finds it loaded.
    assert_eq!(torchapprox::cuda::f_load_backend().unwrap(), has);
    let available = torchapprox::cuda::f_is_available().unwrap();
    assert_eq!(available, torchapprox::cuda::driver_present() && tch::Cuda::device_count() > 0);
    assert_eq!(torchapprox::cuda::cuda_if_available() == Device::Cuda(0), available);
    if has && !available {
        // The backend is registered: a CUDA tensor now fails for want of a device, not of
        // libtorch's CUDA library ("Cannot initialize CUDA without ATen_cuda library").
        let e = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))).unwrap_err().to_string();
        assert!(!e.contains("ATen_cuda"), "{e}");
        assert!(e.contains("NVIDIA driver") || e.contains("CUDA"), "{e}");
    }
    if available {
        let t = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 4.0);
    }
}
