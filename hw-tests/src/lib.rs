//! The QEMU test bed: our code drives an emulated NIC through the real Linux `vfio-pci` and
//! an emulated VT-d IOMMU inside a TCG guest.
//!
//! A test reads like "boot a guest with this NIC, run this, talk to it from the host, check
//! what came back":
//!
//! ```no_run
//! use hw_tests::{Guest, Nic};
//! let run = Guest::new("smoke-e1000", Nic::E1000)
//!     .mac("52:54:00:12:34:56")
//!     .run("zs-guest identify")
//!     .start()
//!     .unwrap()
//!     .wait()
//!     .unwrap();
//! run.expect_success();
//! assert_eq!(run.value("MAC"), Some("52:54:00:12:34:56"));
//! ```
//!
//! Set-up comes from `scripts/setup` (QEMU, busybox, the guest kernel in
//! `$ZEROSEND_CACHE`, default `~/.cache/zerosend`). Console logs and pcaps are kept under
//! `target/hw-tests/<name>/`.

pub mod content;
mod guest_programs;
mod initramfs;
pub mod netns;
pub mod pki;
mod qemu;
mod qmp;
pub mod raw_http;
pub mod relay;
pub mod serve_guest;
pub mod wire;

pub use guest_programs::{guest_programs, linux_baseline_program};
pub use initramfs::EXIT_MARKER;
pub use netns::NetNs;
pub use qemu::{Guest, GuestRun, Network, Nic, RunningGuest};

use std::path::PathBuf;

/// One `#[test]` per NIC model of [`Nic::ALL`] for each check `fn(Nic)` named: a module
/// named after the check, with tests `e1000`, `e1000e` and `virtio`. A check that cannot
/// hold for QEMU's virtio-net as written names, after `=> virtio ignored:`, why and where
/// virtio is covered instead.
///
/// ```ignore
/// fn end_to_end(nic: Nic) { /* ... */ }
/// hw_tests::for_each_nic!(end_to_end); // end_to_end::e1000, end_to_end::e1000e, ...
/// ```
#[macro_export]
macro_rules! for_each_nic {
    ($($check:ident $(=> virtio ignored: $why:literal)?),* $(,)?) => {$(
        mod $check {
            #[test]
            fn e1000() {
                super::$check($crate::Nic::E1000)
            }
            #[test]
            fn e1000e() {
                super::$check($crate::Nic::E1000e)
            }
            #[test]
            $(#[ignore = $why])?
            fn virtio() {
                super::$check($crate::Nic::Virtio)
            }
        }
    )*};
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where logs, pcaps and built guest programs go.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The set-up cache (guest kernel and modules).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ZEROSEND_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/zerosend")
}

/// Whether the test bed is installed. Outside CI a test may skip when it is not; in CI
/// (`CI=true`) a missing test bed is a failure, never a skip.
pub fn testbed_ready() -> Result<(), String> {
    let kernel = cache_dir().join("kernel/current/vmlinuz");
    let problems: Vec<String> = [
        (
            kernel.exists(),
            format!("guest kernel {}", kernel.display()),
        ),
        (
            which("qemu-system-x86_64"),
            "qemu-system-x86_64".to_string(),
        ),
        (
            std::path::Path::new("/bin/busybox").exists(),
            "/bin/busybox (busybox-static)".into(),
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "test bed missing: {}; run scripts/setup",
            problems.join(", ")
        ))
    }
}

/// Call at the top of every guest test: panics with the fix when the test bed is missing.
pub fn require_testbed() {
    if let Err(e) = testbed_ready() {
        panic!("{e}");
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// How many frames of a classic pcap carry the network stack's placeholder poison
/// ([`netstack::poison`]): bytes that must never reach a wire. Every guest test that
/// captures what the stack sent checks this is zero. (Of a frame larger than the capture's
/// snaplen, the captured part is scanned.)
pub fn poisoned_frames(pcap: &[u8]) -> Result<usize, String> {
    Ok(wire::pcap_records(pcap)?
        .iter()
        .filter(|(_, f)| netstack::poison::find_poison(f).is_some())
        .count())
}

/// Scans QEMU's own capture of a stopped guest's NIC (`Guest::pcap`) for placeholder
/// poison and fails the run if any frame carries it. QEMU's capture is the wire itself, and
/// unlike the server's `--pcap` file it is not a file the server is appending to while it
/// serves it (a streaming response of a file that changes under it is reset, by design).
pub fn expect_no_poison_on_the_wire(run: &GuestRun) {
    let pcap = std::fs::read(run.pcap_path()).unwrap_or_else(|e| run.fail(&e.to_string()));
    match poisoned_frames(&pcap) {
        Ok(0) => eprintln!(
            "capture of {} bytes scanned: no placeholder poison on the wire",
            pcap.len()
        ),
        Ok(n) => run.fail(&format!("{n} frames on the wire carry placeholder poison")),
        Err(e) => run.fail(&format!("reading the capture: {e}")),
    }
}
