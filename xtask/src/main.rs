//! `cargo xtask`: the two commands a new user runs, and the developer's chores.
//!
//! - `cargo xtask run [-- ARGS]`: installs what is missing, builds, and runs the daemon. With
//!   no `--iface` in ARGS it makes a demo: netns `xvio-demo` and veth `xvio-demo0` (here) ↔
//!   `xvio-demo1` (there), attaches to `xvio-demo0`, and removes it all on Ctrl-C.
//! - `cargo xtask test`: installs what is missing, then fmt, clippy and every test,
//!   privileged ones included (they need root; in CI they must not skip), and last the
//!   README's `cargo xtask run` itself, checked end to end (see `readme_run`).
//! - `cargo xtask bench copy|xsk|vhost|bridge`: the copy-engine benchmark (criterion); AF_XDP
//!   rates on a veth against the XDP_DROP ceiling; guest to guest and NIC to guest against
//!   OVS-DPDK in the same run.

mod deps;
mod readme_run;
mod run;

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, Result, bail};

const USAGE: &str =
    "usage: cargo xtask run [-- XVIO_RUN_ARGS...] | cargo xtask test [-- CARGO_TEST_ARGS...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run::run(rest(&args)),
        Some("test") => test(rest(&args)),
        Some("bench") => bench(rest(&args)),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments after the subcommand, without a leading `--`.
fn rest(args: &[String]) -> &[String] {
    let rest = &args[1..];
    match rest.first().map(String::as_str) {
        Some("--") => &rest[1..],
        _ => rest,
    }
}

/// `cargo xtask test`.
fn test(extra: &[String]) -> Result<()> {
    deps::ensure(deps::TEST_PACKAGES)?;
    if deps::is_root() {
        deps::ensure_bpffs()?;
    } else {
        eprintln!(
            "xtask: not root: privileged tests (netns, XDP, AF_XDP) will skip; run as root to include them"
        );
    }
    cargo(&["fmt", "--all", "--", "--check"])
        .context("cargo fmt found unformatted code (run `cargo fmt --all`)")?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The daemon tests run the `xvio` binary, which `cargo test` does not build for another
    // package's tests: build it first and point the tests at it.
    cargo(&["build", "-p", "xvio", "--bin", "xvio"])?;
    let bin = target_dir().join("debug/xvio");
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let totals = cargo_test(&args, &bin)?;
    readme_run::check()?;
    println!("{totals}; the README's `cargo xtask run`: ok");
    Ok(())
}

/// Runs `cargo test …`, echoing its output, and closes with one line that adds up every
/// test binary's `test result:` line (the last binary alone, often doc-tests, says little).
fn cargo_test(args: &[&str], xvio_bin: &std::path::Path) -> Result<TestTotals> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut child = Command::new(&cargo)
        .args(args)
        .env("XVIO_BIN", xvio_bin)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let mut totals = TestTotals::default();
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("{totals}");
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(totals)
}

/// Sums of cargo test's `test result: ok. 3 passed; 0 failed; 1 ignored; …` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl std::fmt::Display for TestTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tests: {} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// `cargo xtask bench copy|xsk|vhost|bridge`: the copy-engine benchmark (criterion), the
/// AF_XDP rates against the in-kernel ceiling, guest to guest and NIC to guest against
/// OVS-DPDK; release builds.
fn bench(args: &[String]) -> Result<()> {
    let (which, extra) = match args.split_first() {
        Some((first, rest)) if !first.starts_with('-') => (first.as_str(), rest),
        _ => ("copy", args),
    };
    match which {
        "copy" => {
            deps::ensure(deps::TEST_PACKAGES)?;
            let mut cargo_args = vec!["bench", "-p", "xvio", "--bench", "copy", "--"];
            cargo_args.extend(extra.iter().map(String::as_str));
            cargo(&cargo_args)
        }
        "xsk" => {
            deps::ensure(deps::TEST_PACKAGES)?;
            if !deps::is_root() {
                bail!("bench xsk makes network namespaces and attaches XDP: run it as root");
            }
            deps::ensure_bpffs()?;
            let mut cargo_args = vec!["bench", "-p", "xvio-tests", "--bench", "xsk", "--"];
            cargo_args.extend(extra.iter().map(String::as_str));
            cargo(&cargo_args)
        }
        "vhost" => {
            deps::ensure(deps::TEST_PACKAGES)?;
            deps::ensure(&["openvswitch-switch-dpdk"])?;
            if !deps::is_root() {
                bail!("bench vhost runs DPDK and OVS-DPDK: run it as root");
            }
            deps::ensure_bpffs()?;
            cargo(&["build", "--release", "-p", "xvio", "--bin", "xvio"])?;
            let mut cargo_args = vec!["bench", "-p", "xvio-tests", "--bench", "vhost", "--"];
            cargo_args.extend(extra.iter().map(String::as_str));
            cargo(&cargo_args)
        }
        "bridge" => {
            deps::ensure(deps::TEST_PACKAGES)?;
            deps::ensure(&["openvswitch-switch-dpdk"])?;
            if !deps::is_root() {
                bail!(
                    "bench bridge makes namespaces and runs XDP, DPDK and OVS-DPDK: run it as root"
                );
            }
            deps::ensure_bpffs()?;
            cargo(&["build", "--release", "-p", "xvio", "--bin", "xvio"])?;
            let mut cargo_args = vec!["bench", "-p", "xvio-tests", "--bench", "bridge", "--"];
            cargo_args.extend(extra.iter().map(String::as_str));
            cargo(&cargo_args)
        }
        other => bail!("no benchmark '{other}'; available: copy, xsk, vhost, bridge"),
    }
}

/// Runs `cargo ARGS…` from the workspace root.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Where cargo puts its builds: `$CARGO_TARGET_DIR` (relative ones from the workspace root,
/// where xtask runs cargo) or `target/`.
fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the workspace")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn adds_up_test_result_lines() {
        let mut t = TestTotals::default();
        t.add("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.79s");
        t.add("test foo ... ok");
        assert_eq!(
            t,
            TestTotals {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
    }
}
