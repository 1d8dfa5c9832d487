//! Compiles the XDP programs in `ebpf/` with clang's BPF backend, with BTF, into `$OUT_DIR`:
//! `xvio.bpf.o` (the datapath's, embedded as `XDP_OBJECT`) and `bench.bpf.o` (the
//! benchmark's generator and drop counter, embedded as `BENCH_OBJECT`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

const INSTALL_HINT: &str =
    "apt-get install clang libbpf-dev (or run `cargo xtask test`, which installs them)";

fn main() {
    if let Err(e) = build() {
        // One line a user can act on, no backtrace.
        eprintln!("error: building the XDP program: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest
        .join("../ebpf")
        .canonicalize()
        .context("ebpf/ folder is missing")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", ebpf.join("xvio.h").display());
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if Command::new(&clang).arg("--version").output().is_err() {
        bail!("`{clang}` was not found; {INSTALL_HINT}");
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        bail!("the libbpf headers (/usr/include/bpf/bpf_helpers.h) are missing; {INSTALL_HINT}");
    }
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", env::consts::ARCH));
    for name in ["xvio", "bench"] {
        let source = ebpf.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", source.display());
        let output = Command::new(&clang)
            .args([
                "-O2", "-g", "-target", "bpfel", "-mcpu=v3", "-Wall", "-Werror",
            ])
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg(format!("-I{}", ebpf.display()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.bpf.o")))
            .output()
            .with_context(|| format!("running {clang}"))?;
        if !output.status.success() {
            bail!(
                "clang failed on {}:\n{}",
                source.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
