//! Builds the programs that run inside the guest as static binaries, once per test process.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::{target_dir, workspace_root};

/// Paths of the static guest binaries: `zs-guest` (test program) and `zerosend` (the server).
#[derive(Clone, Debug)]
pub struct GuestPrograms {
    pub zs_guest: PathBuf,
    pub zerosend: PathBuf,
}

/// Build (or reuse) the guest programs. The build uses its own target directory: the outer
/// `cargo test` holds the lock on the default one.
pub fn guest_programs() -> &'static GuestPrograms {
    static BUILT: OnceLock<Result<GuestPrograms, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(p) => p,
        Err(e) => panic!("building the guest programs failed:\n{e}"),
    }
}

fn build() -> Result<GuestPrograms, String> {
    let started = std::time::Instant::now();
    let bin = build_static(&[
        "-p",
        "hw-tests",
        "--bin",
        "zs-guest",
        "-p",
        "zerosend",
        "--bin",
        "zerosend",
        // The test hooks (hidden `serve` flags, `zs-guest` subcommands) that arm the
        // drivers' run-time fault injection: dormant unless a test asks for a fault.
        "--features",
        "zerosend/test-hooks,hw-tests/fault-injection",
    ])?;
    eprintln!(
        "hw-tests: guest programs built in {:.1?}",
        started.elapsed()
    );
    Ok(GuestPrograms {
        zs_guest: bin.join("zs-guest"),
        zerosend: bin.join("zerosend"),
    })
}

/// `cargo build --release` of `what` (packages, binaries, features) as static binaries for
/// the guest, in their own target directory (the outer `cargo test` holds the lock on the
/// default one); returns the directory the binaries are in.
fn build_static(what: &[&str]) -> Result<PathBuf, String> {
    let target = "x86_64-unknown-linux-gnu";
    let dir = target_dir().join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--target", target, "--target-dir"])
        .arg(&dir)
        .args(what)
        // Static glibc binaries run in the busybox initramfs; with an explicit --target the
        // flags do not reach build scripts or proc-macros, which run on the host.
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(dir.join(target).join("release"))
}

/// Build (or reuse) the static `zs-linux-serve` (crate `linux-baseline`), the Linux
/// sendfile/kTLS server `scripts/bench` compares zerosend with. Built on its own, on first
/// use, so the other tests do not wait for it.
pub fn linux_baseline_program() -> &'static PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_linux_baseline) {
        Ok(p) => p,
        Err(e) => panic!("building zs-linux-serve failed:\n{e}"),
    }
}

fn build_linux_baseline() -> Result<PathBuf, String> {
    Ok(build_static(&["-p", "linux-baseline", "--bin", "zs-linux-serve"])?.join("zs-linux-serve"))
}
