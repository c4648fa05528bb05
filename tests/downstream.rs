//! The README's "Use it in your own crate": a crate outside this workspace (tests/downstream)
//! builds and runs with plain `cargo build` after `scripts/setup.sh --project`, nothing exported.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::TempDir;

/// A command without anything this test process inherited from cargo that would help it.
fn clean(mut c: Command) -> Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO")
            || k.starts_with("LIBTORCH")
            || k.contains("RUSTFLAGS")
            || k == "LD_LIBRARY_PATH"
        {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn a_users_crate_builds_and_runs_after_setup_project() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = TempDir::new("downstream");
    let dir = tmp.0.join("user-crate");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = std::fs::read_to_string(root.join("tests/downstream/Cargo.toml")).unwrap();
    let manifest = manifest.replace("path = \"../..\"", &format!("path = {:?}", root.display().to_string()));
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(root.join("tests/downstream/src/main.rs"), dir.join("src/main.rs")).unwrap();
    // The same versions as this crate's own build, so nothing new is resolved.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let mut setup = clean(Command::new("bash"));
    let o = setup.arg(root.join("scripts/setup.sh")).arg("--project").arg(&dir).output().unwrap();
    assert!(o.status.success(), "setup.sh --project: {}", String::from_utf8_lossy(&o.stderr));
    let config = std::fs::read_to_string(dir.join(".cargo/config.toml")).unwrap();
    assert!(config.contains("LIBTORCH = \"") && config.contains("-Wl,-rpath,"), "{config}");
    assert!(!config.contains(&root.display().to_string()), "the config points into this checkout: {config}");

    // A target folder in set-up's cache, beside the venv: torch-sys (libtorch's C++ bindings,
    // minutes to compile) is built once per machine, not once per clone; this checkout's
    // crate, a path dependency, is rebuilt every time and cleaned out after.
    let cache = std::env::var_os("TORCHAPPROX_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torchapprox")));
    let target =
        cache.map_or_else(|| root.join("target").join("downstream"), |c| c.join("downstream-target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let mut build = clean(Command::new(cargo));
    let o =
        build.current_dir(&dir).env("CARGO_TARGET_DIR", &target).args(["build", "--quiet"]).output().unwrap();
    assert!(o.status.success(), "cargo build in the user's crate: {}", String::from_utf8_lossy(&o.stderr));
    eprintln!("downstream build: {:.1} s", started.elapsed().as_secs_f64());
    let bin = target.join("debug").join("downstream-check");
    let o = clean(Command::new(&bin)).current_dir(Path::new("/")).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "the user's binary: {} {}", out, String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("downstream ok: loss ") && out.contains("int_max 127"), "{out}");
    // The crate's loader of libtorch's CUDA library runs before the user's main: asked to
    // (there is no driver here), it has loaded the library by then.
    let driver = torchapprox::cuda::driver_present();
    assert!(out.contains(&format!("cuda backend loaded at start: {driver}")) || driver, "{out}");
    let o = clean(Command::new(&bin))
        .current_dir(Path::new("/"))
        .env("TORCHAPPROX_CUDA", "always")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the user's binary, TORCHAPPROX_CUDA=always: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let has = Path::new(env!("CARGO_MANIFEST_DIR")).join(".libtorch/lib/libtorch_cuda.so").exists();
    assert!(out.contains(&format!("cuda backend loaded at start: {has}")), "{out}");
    // Each checkout's path is a new package to cargo: its artifacts would pile up.
    let o = clean(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())))
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target)
        .args(["clean", "--quiet", "-p", "torchapprox", "-p", "downstream-check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "cargo clean: {}", String::from_utf8_lossy(&o.stderr));

    // An existing config of the user's own is never overwritten.
    std::fs::write(dir.join(".cargo/config.toml"), "[build]\njobs = 1\n").unwrap();
    let o = clean(Command::new("bash"))
        .arg(root.join("scripts/setup.sh"))
        .arg("--project")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("was not written by this script"));
    assert_eq!(std::fs::read_to_string(dir.join(".cargo/config.toml")).unwrap(), "[build]\njobs = 1\n");
}

#[test]
fn setup_project_writes_nothing_into_the_checkout() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = TempDir::new("readonly-checkout");
    // A checkout of its own (the script finds the root from its own path), and a user's crate.
    let checkout = tmp.0.join("checkout");
    std::fs::create_dir_all(checkout.join("scripts")).unwrap();
    std::fs::copy(root.join("scripts/setup.sh"), checkout.join("scripts/setup.sh")).unwrap();
    let user = tmp.0.join("user");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("Cargo.toml"), "[package]\nname = \"u\"\nversion = \"0.1.0\"\n").unwrap();
    let before: Vec<_> = std::fs::read_dir(&checkout).unwrap().flatten().map(|e| e.file_name()).collect();
    let o = clean(Command::new("bash"))
        .arg(checkout.join("scripts/setup.sh"))
        .arg("--project")
        .arg(&user)
        .output()
        .unwrap();
    assert!(o.status.success(), "setup.sh --project: {}", String::from_utf8_lossy(&o.stderr));
    let after: Vec<_> = std::fs::read_dir(&checkout).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(before, after, "setup.sh --project wrote into the checkout");
    assert!(user.join(".cargo/config.toml").exists());
}
