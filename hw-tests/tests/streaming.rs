//! Streaming snapshots end to end (issue 12), in a guest with a page cache of 32 MiB: files
//! far larger than the cache are served byte-exact, many at once, while writers replace them;
//! every body is exactly one version (each 4 KiB block is stamped with its version); the
//! pinned and old-version pages stay within their bounds (read from the metrics).
//!
//! One virtio guest (2 GiB of memory, so a 1 GiB file fits in its tmpfs): the NIC model does
//! not matter here, the page cache and the server loop do; every model's data path is
//! covered by `server.rs`.

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_tests::content::{check_stamped, stamped_block, stamped_version, STAMP_BLOCK};
use hw_tests::netns::GUEST_IP;
use hw_tests::raw_http::{connect, content_length, put_stamped, read_head};
use hw_tests::serve_guest::{ACCESS_FLAGS, METRICS_PORT};
use hw_tests::{Guest, Network, Nic, RunningGuest};

const PORT: u16 = 80;
const CACHE_MB: usize = 32;
/// 16 files of 8 MiB: 4x the cache.
const FILES: usize = 16;
const FILE_BLOCKS: usize = 2048;
/// 1 GiB in 4 KiB stamped blocks.
const HUGE_BLOCKS: usize = 1 << 18;
const PIN_WINDOW_KB: u64 = 640;

fn path(i: usize) -> String {
    format!("/f{i:02}.bin")
}

/// GET `path` on a new connection: status line and body.
fn get(path: &str) -> (String, Vec<u8>) {
    get_on(PORT, path)
}

fn get_on(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = connect(port);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let head = read_head(&mut r);
    let mut body = vec![0u8; content_length(&head)];
    r.read_exact(&mut body).unwrap();
    (head.lines().next().unwrap_or("").to_string(), body)
}

/// PUT `body` to `path` (a `Content-Range` covering all of it when `in_place`); the status.
fn put(path: &str, body: &[u8], in_place: bool) -> u16 {
    let mut s = connect(PORT);
    let range = if in_place {
        format!("Content-Range: bytes 0-{}/*\r\n", body.len() - 1)
    } else {
        String::new()
    };
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Length: {}\r\n{range}\r\n",
        body.len()
    )
    .unwrap();
    if s.write_all(body).is_err() {
        return 0; // refused early (and closed)
    }
    let head = read_head(&mut BufReader::new(s));
    head[9..12].parse().unwrap()
}

struct Bed {
    guest: RunningGuest,
}

impl Bed {
    fn boot() -> Bed {
        let mut guest = Guest::new("streaming", Nic::Virtio)
            .network(Network::Tap)
            .memory_mb(3584)
            .timeout(Duration::from_secs(1500));
        for i in 0..FILES {
            guest = guest.file(
                &format!("/data{}", path(i)),
                stamped_version(0, FILE_BLOCKS),
            );
        }
        let guest = guest
            .run(&format!(
                "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
                 --cache-mb {CACHE_MB} --pin-window-kb {PIN_WINDOW_KB} --max-put-mb 2048 \
                 --write-policy cow --stats-interval 10"
            ))
            .start()
            .unwrap();
        guest.wait_for_console("zerosend: serving", Duration::from_secs(300));
        Bed { guest }
    }

    fn on_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.guest.netns().spawn(f).join().unwrap()
    }

    /// A metric's value from the metrics page.
    fn metric(&self, name: &'static str) -> f64 {
        let (_, body) = self.on_netns(|| get_on(METRICS_PORT, "/_zerosend/metrics"));
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    #[track_caller]
    fn check(&self, ok: bool, what: &str) {
        if !ok {
            self.guest.fail(what);
        }
    }
}

/// Every file once, all at once: (status line, version or tear) per file.
fn download_all(bed: &Bed) -> Vec<(String, Result<u32, String>)> {
    let threads: Vec<_> = (0..FILES)
        .map(|i| {
            bed.guest.netns().spawn(move || {
                let (status, body) = get(&path(i));
                (status, check_stamped(&body, FILE_BLOCKS))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn files_far_larger_than_the_cache_stream_as_one_version_each() {
    let bed = Bed::boot();

    // 16 concurrent downloads of different files, 4x the cache: all 200, all version 0.
    let started = Instant::now();
    for (i, (status, version)) in download_all(&bed).into_iter().enumerate() {
        bed.check(
            status.starts_with("HTTP/1.1 200") && version == Ok(0),
            &format!("cold download {i}: {status} {version:?}"),
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "16 concurrent downloads of 8 MiB (4x the {CACHE_MB} MiB cache): all 200 and byte-exact in {secs:.1} s ({:.0} Mbit/s aggregate)",
        (FILES * FILE_BLOCKS * STAMP_BLOCK) as f64 * 8.0 / secs / 1e6
    );

    // The same while two writers publish new versions as fast as they can: one replaces
    // whole files, the other rewrites them in place with a Content-Range covering all of
    // it. Every body must be exactly one version.
    let stop = Arc::new(AtomicBool::new(false));
    let next_version = Arc::new(AtomicU32::new(1));
    let writers: Vec<_> = [false, true]
        .into_iter()
        .map(|in_place| {
            let (stop, next_version) = (stop.clone(), next_version.clone());
            bed.guest.netns().spawn(move || {
                let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
                let mut busy = Duration::ZERO;
                let mut i = usize::from(in_place);
                while !stop.load(Ordering::Relaxed) {
                    let v = next_version.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let status = put(&path(i % FILES), &stamped_version(v, FILE_BLOCKS), in_place);
                    busy += started.elapsed();
                    *statuses.entry(status).or_default() += 1;
                    i += 2;
                }
                (statuses, busy)
            })
        })
        .collect();
    let mut versions_seen = std::collections::BTreeSet::new();
    let mut rounds = 0;
    // At least 3 rounds, and on until the readers have seen new versions (bounded).
    while rounds < 3 || (versions_seen.len() < 3 && rounds < 12) {
        let round = rounds;
        rounds += 1;
        for (i, (status, version)) in download_all(&bed).into_iter().enumerate() {
            bed.check(
                status.starts_with("HTTP/1.1 200") && version.is_ok(),
                &format!("round {round}, download {i} under writers: {status} {version:?}"),
            );
            versions_seen.insert(version.unwrap());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let per_put = |(statuses, busy): &(std::collections::BTreeMap<u16, u32>, Duration)| {
        busy.as_secs_f64() / statuses.values().sum::<u32>().max(1) as f64
    };
    println!(
        "under two writers (whole-file {:?} at {:.2} s per 8 MiB PUT, in-place {:?} at {:.2} s): {} downloads all 200, each exactly one version; {} distinct versions seen",
        written[0].0,
        per_put(&written[0]),
        written[1].0,
        per_put(&written[1]),
        rounds * FILES,
        versions_seen.len()
    );
    let written: Vec<_> = written.into_iter().map(|(statuses, _)| statuses).collect();
    bed.check(
        written[0].get(&204).is_some_and(|&n| n > 0)
            && written[1].get(&204).is_some_and(|&n| n > 0),
        "both writers got versions in",
    );
    bed.check(versions_seen.len() > 1, "the downloads saw new versions");

    // 1 GiB with a 32 MiB cache: uploaded (streamed to disk, larger than the cache) and
    // downloaded, each block checked as it arrives.
    let started = Instant::now();
    let status = bed.on_netns(|| put_stamped(PORT, "/huge.bin", 7, HUGE_BLOCKS));
    let put_secs = started.elapsed().as_secs_f64();
    bed.check(
        status.starts_with("HTTP/1.1 201"),
        &format!("1 GiB PUT: {status}"),
    );
    let started = Instant::now();
    let checked = bed.on_netns(|| {
        let mut s = connect(PORT);
        write!(
            s,
            "GET /huge.bin HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::with_capacity(1 << 20, s);
        let head = read_head(&mut r);
        if content_length(&head) != HUGE_BLOCKS * STAMP_BLOCK {
            return Err(format!("head: {head}"));
        }
        let mut block = [0u8; STAMP_BLOCK];
        for i in 0..HUGE_BLOCKS {
            r.read_exact(&mut block)
                .map_err(|e| format!("block {i}: {e}"))?;
            if block != stamped_block(7, i) {
                return Err(format!("block {i} differs"));
            }
        }
        Ok(())
    });
    let get_secs = started.elapsed().as_secs_f64();
    bed.check(checked.is_ok(), &format!("1 GiB GET: {checked:?}"));
    println!(
        "1 GiB with --cache-mb {CACHE_MB}: PUT 201 in {put_secs:.1} s ({:.0} Mbit/s), GET byte-exact in {get_secs:.1} s ({:.0} Mbit/s)",
        8.0 * (1u64 << 30) as f64 / put_secs / 1e6,
        8.0 * (1u64 << 30) as f64 / get_secs / 1e6
    );

    // The bounds, from the server's own counters.
    let pinned_peak = bed.metric("zerosend_pinned_pages_peak");
    let old_peak = bed.metric("zerosend_old_version_pages_peak");
    let old_limit = bed.metric("zerosend_old_version_pages_limit");
    // What may be pinned at once: each of the 16 readers its window (plus a few pages whose
    // bytes are acknowledged but whose transmission the NIC has not reported complete yet),
    // and the in-place writer's 8 MiB body while its fsync writes it back (writeback pins the
    // frames it reads). Nothing in it grows with the size of the files served (32,768 pages
    // for the 16 files, 262,144 for the 1 GiB one).
    let window_pages = (PIN_WINDOW_KB * 1024 / 4096) as f64;
    let pinned_bound = FILES as f64 * (window_pages + 16.0) + FILE_BLOCKS as f64;
    println!(
        "peak pinned pages {pinned_peak} (bound {pinned_bound} = {FILES} x ({window_pages} window + 16) + {FILE_BLOCKS} in writeback; cache {} pages); peak old-version pages {old_peak} (limit {old_limit})",
        CACHE_MB * 256
    );
    bed.check(
        pinned_peak <= pinned_bound,
        "pinned pages beyond the window bound",
    );
    bed.check(
        old_peak <= old_limit,
        "old-version pages beyond their limit",
    );
    bed.check(
        bed.metric("zerosend_audit_violations_total") == 0.0,
        "audit",
    );
    bed.check(
        bed.metric("zerosend_tx_unmapped_drops_total") == 0.0,
        "placeholder segments",
    );
    bed.guest.stop_server();
}
