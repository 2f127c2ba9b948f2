//! A network namespace the harness creates (and deletes) itself, holding a TAP device that
//! the guest's NIC is attached to, so real host-kernel peers (Linux TCP, curl, openssl) can
//! talk to the guest without touching any other network.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// The host end's address inside the namespace, and the address tests give the guest.
pub const HOST_IP: &str = "10.99.0.1";
pub const GUEST_IP: &str = "10.99.0.2";
pub const PREFIX_LEN: u8 = 24;
pub const TAP_NAME: &str = "zstap0";

pub struct NetNs {
    name: String,
}

/// Namespaces this process created and has not deleted yet. A process that ends through
/// `std::process::exit` or a signal runs no destructors, so it calls
/// [`NetNs::delete_all_created`] on the way out instead.
static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn created() -> std::sync::MutexGuard<'static, Vec<String>> {
    // The list stays valid even if a thread panicked while holding the lock.
    CREATED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl NetNs {
    /// Create `zs-<pid>-<n>` with loopback up and a TAP device at [`HOST_IP`].
    pub fn create() -> Result<Self, String> {
        Self::create_with_tap_queues(1)
    }

    /// A namespace whose TAP is multi-queue (`IFF_MULTI_QUEUE`), for QEMU's `tap,queues=N`
    /// behind a virtio-net device with `mq=on`.
    pub fn create_with_tap_queues(queues: u32) -> Result<Self, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "zs-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])
            .map_err(|e| format!("{e} (creating a network namespace needs root)"))?;
        created().push(name.clone());
        let ns = NetNs { name };
        let cidr = format!("{HOST_IP}/{PREFIX_LEN}");
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let mut tuntap = vec![
            "-n", &ns.name, "tuntap", "add", "dev", TAP_NAME, "mode", "tap",
        ];
        if queues > 1 {
            tuntap.push("multi_queue");
        }
        ip(&tuntap)?;
        ip(&["-n", &ns.name, "addr", "add", &cidr, "dev", TAP_NAME])?;
        ip(&["-n", &ns.name, "link", "set", TAP_NAME, "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Delete every namespace this process created that is still there (their [`NetNs`]
    /// values are left with nothing to delete). For exits that skip destructors: a
    /// namespace outlives the process otherwise. Processes still inside one (QEMU) keep it
    /// alive, unnamed, until they end.
    pub fn delete_all_created() {
        for name in created().drain(..) {
            let _ = ip(&["netns", "del", &name]);
        }
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `f` on a new thread that has entered the namespace: sockets it opens live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd affects only the calling thread's network
            // namespace; no memory is involved.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let mut created = created();
        if let Some(i) = created.iter().position(|n| *n == self.name) {
            created.swap_remove(i);
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}
