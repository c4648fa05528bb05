//! Embeds libtorch's folder as an rpath so binaries, tests and examples run without LD_LIBRARY_PATH.

fn main() {
    // torch-sys exports its library folder to crates that depend on it directly.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
