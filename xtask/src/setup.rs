//! Installs what building and running Verse needs on a fresh Debian machine, and nothing twice.
//!
//! The eBPF crate is compiled by Debian's `rustc-web` (rustc 1.96 with LLVM 22) whose sysroot
//! carries a prebuilt `core` for `bpfel-unknown-none` (`libstd-rust-web-dev-bpf`): the machine's
//! stable rustup toolchain has no such `core` and nightly `-Z build-std` is not available.
//! bpf-linker 0.13.0 is built from crates.io against Debian's LLVM 22.
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages: the eBPF compiler and LLVM for bpf-linker, then the tools the daemon, the
/// tests, the demo and the benchmarks run.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "nftables",
    "iptables",
    "tcpdump",
    "bpftool",
    "xdp-tools",
    // The benchmarks read and set offloads (GRO) of their veths.
    "ethtool",
    "curl",
    // The font of the benchmark plots.
    "fonts-dejavu-core",
    // The fleet's control plane: etcd for tests and the demo, etcdctl to inspect it.
    "etcd-server",
    "etcd-client",
    // The etcd-client crate compiles etcd's protos at build time: protoc, and the well-known
    // types (google/protobuf/*.proto) its protos import.
    "protobuf-compiler",
    "libprotobuf-dev",
    // The API fuzz runs schemathesis (PyPI) from a virtual environment (see install_schemathesis).
    "python3-venv",
    // The web page's test drives headless Chromium over WebDriver (tests/tests/ui_browser.rs).
    "chromium",
    "chromium-driver",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    install_rust_components()?;
    install_packages()?;
    install_bpf_linker()?;
    install_schemathesis()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing Debian packages: {}", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-q"]))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `cargo xtask test` checks the formatting and the lints first: rustup's rustfmt and clippy.
fn install_rust_components() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let have = |tool: &str| {
        Command::new(&cargo).args([tool, "--version"]).output().is_ok_and(|o| o.status.success())
    };
    if have("fmt") && have("clippy") {
        return Ok(());
    }
    eprintln!("xtask setup: installing the rustfmt and clippy components");
    crate::run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
        .context("rustup component add rustfmt clippy")
}

fn install_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        Command::new(cargo)
            .args(["install", "--no-default-features", "--features", "llvm-22"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("cargo install bpf-linker")?;
    let out = Command::new("bpf-linker").arg("--version").output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("bpf-linker was installed but is not on PATH (add ~/.cargo/bin to PATH)"),
    }
}

/// The schema-driven fuzz of the API (tests/tests/api_fuzz.rs) runs schemathesis, from the
/// Python package registry, in a virtual environment under target/: nothing is installed
/// system-wide, and the test finds it at [`SCHEMATHESIS_DIR`]`/bin/schemathesis`.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
const SCHEMATHESIS_DIR: &str = "target/schemathesis";

fn install_schemathesis() -> Result<()> {
    let venv = crate::root().join(SCHEMATHESIS_DIR);
    let python = venv.join("bin/python");
    let current = Command::new(&python)
        .args(["-c", "import importlib.metadata as m; print(m.version('schemathesis'))"])
        .output();
    if let Ok(out) = current {
        if String::from_utf8_lossy(&out.stdout).trim() == SCHEMATHESIS_VERSION {
            return Ok(());
        }
    }
    eprintln!(
        "xtask setup: installing schemathesis {SCHEMATHESIS_VERSION} into {}",
        venv.display()
    );
    crate::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("python3 -m venv (Debian: python3-venv)")?;
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("schemathesis=={SCHEMATHESIS_VERSION}")),
    )
    .context("pip install schemathesis")
}
