//! Pin+release throughput of cached pages with 1, 2, 4 and 8 threads, on one file and on
//! different files: the file-lock path every pin took before (`CachedFile::pin_locked`)
//! against the lock-free path (`CachedFile::pin`), measured alternately in the same run.
//!
//! Run with `nice -n 5 cargo bench -p pagecache --bench pin_scaling` (set `PIN_ROUNDS` for
//! more rounds than 7, `PIN_ITERS` for more pins per thread and run than 300000).
//!
//! Each run: `threads` threads wait at a barrier, then each pins and releases one cached
//! 4 KiB page `PIN_ITERS` times; throughput = all pins / wall time from the barrier to the
//! last thread's end. Scenarios: "one file" (each thread its own page of one shared file, as
//! in the benchmark), "same page" (every thread the same page: the frame's state word
//! is shared by construction) and "own files" (each thread its own file). Per scenario,
//! thread count and path: median and range over the rounds, then the ratios. A control
//! (unshared work, no page cache) shows what a second thread gives on the machine at that
//! moment. Each thread's CPU time and run-queue wait (from `/proc/thread-self/schedstat`) give
//! the CPU cost per pin, which grows with contention (bouncing lines, spinning) when threads
//! really run at once, and the share of time threads waited for a CPU.

mod common;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

use pagecache::{CacheConfig, CachedFile, FrameArena, OpenOptions, PageCache, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
const FILE_PAGES: usize = 64;
const THREADS: [usize; 4] = [1, 2, 4, 8];

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Locked,
    LockFree,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Locked => "locked",
            Path::LockFree => "lock-free",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    OneFile,
    SamePage,
    OwnFiles,
    /// Each thread streams its own snapshots of one shared file (`Snapshot::pin_next`, one
    /// page at a time, a new snapshot every 64 pins): the server's download path.
    Stream,
    Control,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::OneFile => "one file, own pages",
            Scenario::SamePage => "one file, same page",
            Scenario::OwnFiles => "own files",
            Scenario::Stream => "one file, streaming snapshots (pin_next)",
            Scenario::Control => "control: no page cache, nothing shared",
        }
    }
}

/// The control's unit of work: an allocation and a small checksum, nothing shared between
/// threads. How its throughput grows with threads is what the machine gives at the moment
/// (a shared, loaded 2-core machine gives far less than 2x).
fn control_work(seed: u64) -> u32 {
    let buf = Box::new([seed; 8]);
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
    crc32fast::hash(&bytes)
}

struct Fixture {
    _dirs: Vec<tempfile::TempDir>,
    _cache: PageCache,
    files: Vec<CachedFile>,
}

fn fixture() -> Fixture {
    let max_threads = *THREADS.iter().max().unwrap();
    let bytes = FILE_PAGES * PAGE_SIZE;
    let arena = FrameArena::anonymous(1 << 32, (max_threads + 2) * bytes + 64 * PAGE_SIZE).unwrap();
    let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for i in 0..max_threads {
        let (dir, path) = common::temp_file("pagecache-pin-scaling", bytes, i as u8);
        let file = cache.open(&path, OpenOptions::read_only()).unwrap();
        drop(file.pin(0..file.len()).unwrap()); // every page resident
        dirs.push(dir);
        files.push(file);
    }
    Fixture {
        _dirs: dirs,
        _cache: cache,
        files,
    }
}

/// This thread's time on a CPU and time waiting for one (runnable), in ns, from
/// `/proc/thread-self/schedstat` (zeros where it is not available).
fn sched_ns() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

/// What one run measured.
struct Measured {
    /// Pins per second of wall time, all threads together.
    rate: f64,
    /// CPU time per pin, over all threads (ns): rises with cache-line bouncing and spinning
    /// when threads really run at once; does not count time parked on a lock or preempted.
    cpu_ns: f64,
    /// Share of the threads' time spent runnable but waiting for a CPU (other processes and
    /// sessions on the machine, or more threads than cores).
    queued: f64,
}

/// One run.
fn run(f: &Fixture, scenario: Scenario, path: Path, threads: usize, iters: u64) -> Measured {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (file, page) = match scenario {
                Scenario::OneFile => (f.files[0].clone(), (t * 8 % FILE_PAGES) as u64),
                Scenario::SamePage => (f.files[0].clone(), 3),
                Scenario::OwnFiles | Scenario::Control => (f.files[t].clone(), 3),
                Scenario::Stream => (f.files[0].clone(), 0),
            };
            let barrier = barrier.clone();
            thread::spawn(move || {
                let range = page * PAGE..(page + 1) * PAGE;
                barrier.wait();
                let (cpu0, queued0) = sched_ns();
                if scenario == Scenario::Control {
                    for i in 0..iters {
                        black_box(control_work(black_box(i)));
                    }
                } else if scenario == Scenario::Stream {
                    let whole = 0..FILE_PAGES as u64 * PAGE;
                    let mut snapshot = file.snapshot(whole.clone()).unwrap();
                    for _ in 0..iters {
                        if snapshot.remaining() == 0 {
                            snapshot = file.snapshot(whole.clone()).unwrap();
                        }
                        let pin = match path {
                            Path::Locked => snapshot.pin_next_locked(PAGE),
                            Path::LockFree => snapshot.pin_next(PAGE),
                        };
                        black_box(pin.unwrap().ready().expect("resident"));
                    }
                } else {
                    for _ in 0..iters {
                        let pin = match path {
                            Path::Locked => file.pin_locked(black_box(range.clone())),
                            Path::LockFree => file.pin(black_box(range.clone())),
                        };
                        black_box(pin.unwrap());
                    }
                }
                let (cpu1, queued1) = sched_ns();
                (cpu1 - cpu0, queued1 - queued0)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let (mut cpu, mut queued) = (0u64, 0u64);
    for w in workers {
        let (c, q) = w.join().unwrap();
        cpu += c;
        queued += q;
    }
    let pins = (threads as u64 * iters) as f64;
    Measured {
        rate: pins / start.elapsed().as_secs_f64(),
        cpu_ns: cpu as f64 / pins,
        queued: queued as f64 / (cpu + queued).max(1) as f64,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it as a quick smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let rounds = if smoke {
        1
    } else {
        env("PIN_ROUNDS", 7) as usize
    };
    let iters = if smoke {
        2000
    } else {
        env("PIN_ITERS", 300_000)
    };
    let f = fixture();
    let scenarios = [
        Scenario::OneFile,
        Scenario::SamePage,
        Scenario::OwnFiles,
        Scenario::Stream,
        Scenario::Control,
    ];
    let csv = std::env::var_os("PIN_CSV").is_some();
    let paths = [Path::Locked, Path::LockFree];
    // results[scenario][threads][path] = pins/s per round
    let mut results = vec![vec![vec![Vec::new(); paths.len()]; THREADS.len()]; scenarios.len()];
    let mut cpu = results.clone();
    let mut queued = results.clone();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "pin_scaling: {rounds} rounds x {iters} pin+release per thread and run, {cores} cores; paths alternate (order flipped every round)"
    );
    for round in 0..rounds {
        for (s, &scenario) in scenarios.iter().enumerate() {
            for (t, &threads) in THREADS.iter().enumerate() {
                let mut order = [0usize, 1];
                if round % 2 == 1 {
                    order.reverse();
                }
                for p in order {
                    let m = run(&f, scenario, paths[p], threads, iters);
                    if csv {
                        println!(
                            "csv;{};{threads};{};{:.0}",
                            scenario.name(),
                            paths[p].name(),
                            m.rate
                        );
                    }
                    results[s][t][p].push(m.rate);
                    cpu[s][t][p].push(m.cpu_ns);
                    queued[s][t][p].push(m.queued);
                }
            }
        }
    }
    let mut medians = vec![vec![[0.0f64; 2]; THREADS.len()]; scenarios.len()];
    let mut cpu_medians = medians.clone();
    for (s, &scenario) in scenarios.iter().enumerate() {
        println!("\n{}:", scenario.name());
        println!(
            "  {:>7}  {:>10}  {:>26}  {:>11}  {:>11}  {:>17}  {:>7}",
            "threads",
            "path",
            "Mpins/s median [min-max]",
            "vs 1 thread",
            "CPU ns/pin",
            "CPU vs 1 thread",
            "queued"
        );
        for (t, &threads) in THREADS.iter().enumerate() {
            for (p, &path) in paths.iter().enumerate() {
                let runs = &mut results[s][t][p];
                let (min, max) = runs
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
                let med = median(runs);
                medians[s][t][p] = med;
                let cpu_med = median(&mut cpu[s][t][p]);
                cpu_medians[s][t][p] = cpu_med;
                println!(
                    "  {threads:>7}  {:>10}  {:>8.2} [{:>6.2}-{:>6.2}]    {:>10.2}x  {:>11.1}  {:>16.2}x  {:>6.0}%",
                    path.name(),
                    med / 1e6,
                    min / 1e6,
                    max / 1e6,
                    med / medians[s][0][p],
                    cpu_med,
                    cpu_med / cpu_medians[s][0][p],
                    100.0 * median(&mut queued[s][t][p]),
                );
            }
        }
        for (t, &threads) in THREADS.iter().enumerate() {
            println!(
                "  {threads} thread(s): lock-free / locked = {:.2}x",
                medians[s][t][1] / medians[s][t][0]
            );
        }
    }
    let one_file = &medians[0];
    let control = &medians[4];
    let control_2 = (control[1][0] + control[1][1]) / (control[0][0] + control[0][1]);
    println!(
        "\nheadline (one file, own pages): 2 threads / 1 thread = {:.2}x lock-free, {:.2}x locked; \
         the control gains {control_2:.2}x from a second thread now, so relative to what the \
         machine gives: {:.2} lock-free, {:.2} locked (1.00 = scales like unshared work)",
        one_file[1][1] / one_file[0][1],
        one_file[1][0] / one_file[0][0],
        one_file[1][1] / one_file[0][1] / control_2,
        one_file[1][0] / one_file[0][0] / control_2,
    );
    let cpu_one = &cpu_medians[0];
    println!(
        "CPU per pin (one file, own pages), 2 threads vs 1: {:.2}x lock-free, {:.2}x locked \
         (1.00 = no contention cost; only meaningful where the threads ran at once, see queued)",
        cpu_one[1][1] / cpu_one[0][1],
        cpu_one[1][0] / cpu_one[0][0],
    );
}
