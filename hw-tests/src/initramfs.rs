//! The guest's initramfs: busybox, the VFIO modules, our programs, an `/init` that binds the
//! NICs to vfio-pci and runs one command, and per-run files.
//!
//! Linux accepts concatenated cpio archives, so a base archive (same for every guest in a
//! test process) is built once and each run appends a small archive of its own.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use cpio::newc::{trailer, Builder};

use crate::{cache_dir, guest_programs};

/// Printed by `/init` after the command, with its exit status.
pub const EXIT_MARKER: &str = "ZEROSEND-GUEST-EXIT:";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "zs-init: booted"
for m in $(cat /lib/zs-modules/order); do
  insmod /lib/zs-modules/$m || echo "zs-init: insmod $m failed"
done
# Bind every NIC named in /etc/zs-bind ("vendor device" lines) to vfio-pci by id.
if [ -f /etc/zs-bind ]; then
  while read vendor device; do
    echo "$vendor $device" > /sys/bus/pci/drivers/vfio-pci/new_id 2>/dev/null
    for d in /sys/bus/pci/devices/*; do
      if [ "$(cat $d/vendor)" = "0x$vendor" ] && [ "$(cat $d/device)" = "0x$device" ]; then
        n=$(basename $d)
        if [ -e $d/driver ]; then drv=$(basename $(readlink $d/driver)); else drv=none; fi
        if [ -e $d/iommu_group ]; then grp=$(basename $(readlink $d/iommu_group)); else grp=none; fi
        echo "zs-init: $n $vendor:$device driver=$drv iommu_group=$grp"
      fi
    done
  done < /etc/zs-bind
fi
# Under QEMU's TCG a 64 KiB glibc memcpy ran at 164 MB/s in this guest (glibc uses
# `rep movsb` from 4 KiB up on a CPU that reports ERMS, as `-cpu max` does), against
# 1,558 MB/s with the threshold raised so it keeps to its AVX2 loop; on the host both ran at
# about 30 GB/s. Every guest program (zerosend and the Linux baselines alike) gets the
# raised threshold; `rep stosb` (memset) is raised too, by analogy, not measured.
export GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1099511627776:glibc.cpu.x86_rep_stosb_threshold=1099511627776
cd /run
sh /etc/zs-run.sh
rc=$?
echo "ZEROSEND-GUEST-EXIT: $rc"
poweroff -f
"#;

/// One entry of a per-run archive: a regular file, a symbolic link (`data` is the target)
/// or a directory, by `mode` (the `st_mode` bits, type included), with its modification time.
#[derive(Clone, Debug)]
pub struct GuestFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
    /// Seconds since the epoch (0 for harness-made files).
    pub mtime: u32,
}

fn push(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    push_with_mtime(out, name, mode, data, 0)
}

fn push_with_mtime(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], mtime: u32) {
    let mut w = Builder::new(name)
        .mode(mode)
        .nlink(1)
        .mtime(mtime)
        .write(Vec::new(), data.len() as u32);
    w.write_all(data).unwrap();
    let buf = w.finish().unwrap();
    out.extend_from_slice(&buf);
}

fn push_dir(out: &mut Vec<u8>, name: &str) {
    push(out, name, 0o040755, &[]);
}

/// The base archive, built once per process and kept in memory (a file per test process
/// would be left behind by every run).
pub fn base_archive() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let progs = guest_programs();
        let modules = cache_dir().join("kernel/current/modules");
        let mut out = Vec::new();
        for d in [
            "bin",
            "sbin",
            "etc",
            "lib",
            "lib/zs-modules",
            "usr",
            "usr/bin",
            "usr/sbin",
            "data",
        ] {
            push_dir(&mut out, d);
        }
        let read =
            |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        push(
            &mut out,
            "bin/busybox",
            0o100755,
            &read(Path::new("/bin/busybox")),
        );
        push(&mut out, "init", 0o100755, INIT.as_bytes());
        push(&mut out, "bin/zs-guest", 0o100755, &read(&progs.zs_guest));
        push(&mut out, "bin/zerosend", 0o100755, &read(&progs.zerosend));
        let order = read(&modules.join("order"));
        push(&mut out, "lib/zs-modules/order", 0o100644, &order);
        for m in String::from_utf8_lossy(&order).split_whitespace() {
            push(
                &mut out,
                &format!("lib/zs-modules/{m}"),
                0o100644,
                &read(&modules.join(m)),
            );
        }
        let mut out = trailer(out).unwrap();
        // Keep the next concatenated archive 4-byte aligned (the kernel requires it).
        while out.len() % 512 != 0 {
            out.push(0);
        }
        out
    })
}

/// Write `base + per-run archive` to `dest`.
pub fn build_run_initramfs(dest: &Path, bind: &[(u16, u16)], script: &str, files: &[GuestFile]) {
    let mut out = base_archive().to_vec();
    let mut run = Vec::new();
    let bind_lines: String = bind
        .iter()
        .map(|(v, d)| format!("{v:04x} {d:04x}\n"))
        .collect();
    push(&mut run, "etc/zs-bind", 0o100644, bind_lines.as_bytes());
    push(
        &mut run,
        "etc/zs-run.sh",
        0o100755,
        format!("set -e\n{script}\n").as_bytes(),
    );
    let mut dirs: Vec<String> = Vec::new();
    for file in files {
        let name = file.path.trim_start_matches('/');
        let mut prefix = String::new();
        for part in Path::new(name).parent().into_iter().flat_map(|p| p.iter()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&part.to_string_lossy());
            if !dirs.contains(&prefix) {
                push_dir(&mut run, &prefix);
                dirs.push(prefix.clone());
            }
        }
        push_with_mtime(&mut run, name, file.mode, &file.data, file.mtime);
    }
    let run = trailer(run).unwrap();
    out.extend_from_slice(&run);
    fs::write(dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
