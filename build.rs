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
    // The same headers, C++ standard and ABI as torch-sys's own torch_api.cpp.
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .opt_level(2)
        .files(SOURCES.iter().map(|f| format!("src/glue/{f}")))
        .compile("torchapprox_glue");
}
