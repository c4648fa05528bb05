//! Compiles the C++ glue (src/glue) against torch-sys's libtorch and embeds libtorch's folder
//! as an rpath, so binaries, tests and examples run without LD_LIBRARY_PATH.

use std::path::PathBuf;

fn main() {
    const SOURCES: [&str; 5] = ["border.cpp", "autograd.cpp", "parallel.cpp", "jit.cpp", "ops.cpp"];
    println!("cargo:rerun-if-changed=src/glue");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys exports its library folder to crates that depend on it directly.
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report libtorch's lib folder"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    // Each file takes tens of seconds against libtorch's headers: the two libraries compile
    // side by side, and cc's `parallel` feature compiles their files in parallel (as many as
    // cargo's jobserver allows).
    std::thread::scope(|s| {
        s.spawn(|| distributed(root));
        glue_build(root).files(SOURCES.iter().map(|f| format!("src/glue/{f}"))).compile("torchapprox_glue");
    });
}

/// A C++ build with the same headers, C++ standard and ABI as torch-sys's own torch_api.cpp.
fn glue_build(root: &std::path::Path) -> cc::Build {
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .opt_level(2);
    b
}

/// c10d's Gloo group needs gloo's headers, which PyPI's torch does not ship (Debian's
/// `libgloo-dev` has them; scripts/setup.sh installs it). Without them the crate builds
/// anyway and `distributed` says what is missing at run time (cfg `torchapprox_gloo`).
fn distributed(root: &std::path::Path) {
    println!("cargo::rustc-check-cfg=cfg(torchapprox_gloo)");
    println!("cargo::rustc-check-cfg=cfg(torchapprox_nccl)");
    let nccl_wanted = std::env::var_os("CARGO_FEATURE_NCCL").is_some();
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    let candidates: Vec<PathBuf> = std::env::var_os("GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/include", "/usr/local/include"].map(PathBuf::from))
        .collect();
    let Some(gloo) = candidates.into_iter().find(|d| d.join("gloo/config.h").exists()) else {
        if nccl_wanted {
            // The NCCL group sits beside a Gloo one: asked for, it must not vanish silently.
            eprintln!("error: the `nccl` feature needs gloo's headers too (install libgloo-dev or run scripts/setup.sh)");
            std::process::exit(1);
        }
        println!("cargo:warning=gloo headers not found (install libgloo-dev or run scripts/setup.sh): torchapprox::distributed will refuse to start");
        return;
    };
    let mut b = glue_build(root);
    b.include(gloo).flag("-DUSE_C10D_GLOO").file("src/glue/distributed.cpp");
    if nccl_wanted {
        nccl(root, &mut b);
    }
    b.compile("torchapprox_distributed");
    println!("cargo:rustc-cfg=torchapprox_gloo");
}

/// The `nccl` feature: c10d's NCCL group, compiled against CUDA's and NCCL's headers (PyPI's
/// torch brings NCCL's; `nvidia-cuda-crt` and `nvidia-cuda-cccl` complete CUDA's, and
/// scripts/setup.sh installs them) and linked with libtorch's CUDA libraries. A build that
/// asks for it where the headers are missing stops with what is missing.
fn nccl(root: &std::path::Path, b: &mut cc::Build) {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=NCCL_INCLUDE");
    // Beside PyPI's torch: site-packages/nvidia/{cu13,nccl}/include (the folder may be a link).
    let torch = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let nvidia = torch.parent().map(|p| p.join("nvidia")).unwrap_or_default();
    let cuda_dirs: Vec<PathBuf> = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .chain([
            nvidia.join("cu13/include"),
            nvidia.join("cu12/include"),
            PathBuf::from("/usr/local/cuda/include"),
        ])
        .collect();
    let nccl_dirs: Vec<PathBuf> = std::env::var_os("NCCL_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([nvidia.join("nccl/include"), PathBuf::from("/usr/include")])
        .collect();
    let find = |dirs: &[PathBuf], file: &str| dirs.iter().find(|d| d.join(file).exists()).cloned();
    let cuda = find(&cuda_dirs, "crt/host_config.h");
    let nccl = find(&nccl_dirs, "nccl.h");
    let (Some(cuda), Some(nccl)) = (cuda, nccl) else {
        // One line, without a build script's panic frames.
        eprintln!(
            "error: the `nccl` feature needs CUDA's headers (crt/host_config.h in one of {cuda_dirs:?}) and \
             NCCL's (nccl.h in one of {nccl_dirs:?}): run scripts/setup.sh, or set CUDA_HOME and NCCL_INCLUDE"
        );
        std::process::exit(1);
    };
    // CUDA 13 keeps libcu++ (<nv/target>) in include/cccl.
    if cuda.join("cccl").is_dir() {
        b.include(cuda.join("cccl"));
    }
    b.include(cuda).include(nccl).flag("-DUSE_C10D_NCCL").flag("-DUSE_CUDA").flag("-Wno-interference-size");
    println!("cargo:rustc-cfg=torchapprox_nccl");
    // torch-sys links torch_cuda already; the NCCL group's inline code calls c10_cuda too.
    println!("cargo:rustc-link-lib=c10_cuda");
}
