//! What the command-line tests share.

use std::process::Command;

/// Runs `zerosend serve` with `args` on a NIC address nothing is bound to, with a fresh
/// root: whatever the flags get past ends at opening the NIC, so a flag error is told apart
/// from it. Returns the exit status and standard error.
pub fn serve(args: &[&str]) -> (i32, String) {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zerosend"))
        .args([
            "serve",
            "--nic",
            "0000:00:00.0",
            "--ip",
            "10.0.0.2/24",
            "--root",
        ])
        .arg(root.path())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
