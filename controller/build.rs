//! Builds `dataplane-ebpf` for `bpfel-unknown-none` and hands the object to the controller,
//! which embeds it (`include_bytes!`).
//!
//! Why not aya-build: its default is nightly rustup with `-Z build-std`, which this project
//! cannot use (no nightly `rust-src`). Debian's `rustc-web` ships a rustc whose sysroot has a
//! prebuilt `core` for `bpfel-unknown-none` (`libstd-rust-web-dev-bpf`), and unstable features
//! are enabled with a crate-scoped `RUSTC_BOOTSTRAP` for two crates alone: aya-ebpf's, and
//! `asm_experimental_arch` for the dataplane's atomic counters (`dataplane-ebpf/src/atomic.rs`:
//! the BPF target has no atomic read-modify-write in `core`).
//! `cargo xtask setup` installs that compiler and bpf-linker.
use std::{env, path::PathBuf, process::Command};

/// Debian's compiler (package `rustc-web`); rustup's comes first on PATH, so name it exactly.
const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    for dir in ["dataplane-ebpf/src", "dataplane-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("dataplane-ebpf/Cargo.toml").display());

    if !PathBuf::from(BPF_RUSTC).exists() {
        panic!(
            "{BPF_RUSTC} is missing: the eBPF dataplane is built with Debian's rustc-web. \
             Run `cargo xtask setup` (installs rustc-web, libstd-rust-web-dev-bpf, bpf-linker)."
        );
    }
    // A separate target dir: the outer cargo holds the lock on the main one.
    let target_dir = root.join("target/bpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-p", "dataplane-ebpf", "--release", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,verse_dataplane");
    // The outer build's settings describe the host build, not this one.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // The kernel loads a word at any address on the machines Verse runs on (x86-64 and arm64
    // have efficient unaligned access, so the verifier does not require alignment of packet
    // pointers): without this, LLVM reads every field of a packet header a byte at a time.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Clink-arg=--cpu-features=+allows-misaligned-mem-access");
    let status = cmd.status().expect("failed to run cargo for dataplane-ebpf");
    if !status.success() {
        panic!("building dataplane-ebpf failed ({status}); see the compiler output above");
    }
    let object = target_dir.join(BPF_TARGET).join("release/verse-dataplane");
    println!("cargo:rustc-env=VERSE_DATAPLANE_OBJECT={}", object.display());
}
