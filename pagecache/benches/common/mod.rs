// Shared by the benches (included with `mod common;`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use criterion::Criterion;

/// A temporary directory (named `prefix`...) holding one file `f` of `bytes` bytes, each
/// `fill`; the file goes when the directory is dropped.
pub fn temp_file(prefix: &str, bytes: usize, fill: u8) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![fill; bytes]).unwrap();
    (dir, path)
}

/// The benches' Criterion settings: short warm-up, few samples, `measurement` per bench.
pub fn criterion(measurement: Duration) -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(measurement)
        .sample_size(20)
}
