//! Whole-file PUT bodies, received into a temporary file beside the target and published by
//! rename ([`pagecache::PageCache::install`]), all on one upload thread so the network loop
//! never touches the disk for them.
//!
//! Why a temporary file: the body can be larger than the page cache (and than memory); a
//! failed or aborted PUT must leave the old file exactly as it was (the temporary file is
//! removed); and readers streaming the old version must go on getting it, byte for byte, while
//! the new one is written and after it is published (the old inode stays open for them).
//!
//! The loop hands each received piece over as it arrives ([`Upload::write`]); bytes handed
//! over and not yet written are bounded per upload ([`UPLOAD_WINDOW`]): a connection whose
//! upload is that far ahead of the disk stops reading, so TCP flow control slows the client
//! down and memory stays bounded.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use pagecache::PageCache;

/// Most bytes of one upload handed to the upload thread and not yet written.
pub const UPLOAD_WINDOW: u64 = 1 << 20;
/// Temporary files are named with this prefix; the server never serves or overwrites such
/// names through HTTP.
pub const UPLOAD_PREFIX: &str = ".zerosend-upload-";

/// What a finished upload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Published: `created` when no file was at the target before.
    Installed { created: bool, bytes: u64 },
    /// Writing, syncing or renaming failed; the target is unchanged and the temporary file
    /// removed.
    Failed(String),
}

/// The state an upload shares with the upload thread.
#[derive(Default)]
struct Shared {
    /// Bytes handed over and not yet written.
    in_flight: AtomicU64,
    outcome: Mutex<Option<Outcome>>,
}

enum Job {
    Write {
        id: u64,
        target: PathBuf,
        data: Vec<u8>,
    },
    Commit {
        id: u64,
        target: PathBuf,
    },
    Abort {
        id: u64,
    },
}

/// The upload thread and the handles that feed it. Cheap to share by reference.
pub struct Uploads {
    jobs: Sender<(Arc<Shared>, Job)>,
    next_id: u64,
}

impl Uploads {
    /// Starts the upload thread; it publishes through `cache` and ends when `Uploads` and all
    /// its [`Upload`]s are dropped.
    pub fn start(cache: PageCache) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("zerosend-upload".into())
            .spawn(move || run(queue, cache))?;
        Ok(Uploads { jobs, next_id: 0 })
    }

    /// A new upload whose body will replace `target` (a path the root resolved for writing).
    pub fn begin(&mut self, target: PathBuf) -> Upload {
        self.next_id += 1;
        Upload {
            id: self.next_id,
            target,
            shared: Arc::new(Shared::default()),
            jobs: self.jobs.clone(),
            committed: false,
        }
    }
}

/// One whole-file PUT being received. Dropping it before [`Upload::commit`] aborts it (the
/// temporary file is removed; the target is untouched).
pub struct Upload {
    id: u64,
    target: PathBuf,
    shared: Arc<Shared>,
    jobs: Sender<(Arc<Shared>, Job)>,
    committed: bool,
}

impl Upload {
    /// Bytes that may be handed over now without exceeding [`UPLOAD_WINDOW`].
    pub fn room(&self) -> u64 {
        UPLOAD_WINDOW.saturating_sub(self.shared.in_flight.load(Ordering::Acquire))
    }

    /// Hands a received piece to the upload thread.
    pub fn write(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.shared
            .in_flight
            .fetch_add(data.len() as u64, Ordering::AcqRel);
        self.send(Job::Write {
            id: self.id,
            target: self.target.clone(),
            data: data.to_vec(),
        });
    }

    /// The body is complete: sync the temporary file and publish it over the target.
    /// [`Upload::outcome`] says when that is done.
    pub fn commit(&mut self) {
        self.committed = true;
        self.send(Job::Commit {
            id: self.id,
            target: self.target.clone(),
        });
    }

    /// Why the upload failed already (writing the temporary file), before its body ended:
    /// the rest of the body is not worth receiving.
    pub fn failure(&self) -> Option<String> {
        match &*self.shared.outcome.lock().expect("not poisoned") {
            Some(Outcome::Failed(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// `Some` once a committed upload has been published (or failed).
    pub fn outcome(&self) -> Option<Outcome> {
        self.shared.outcome.lock().expect("not poisoned").clone()
    }

    fn send(&self, job: Job) {
        // The thread only ends when every sender is gone; a send cannot fail while `self`
        // holds one, unless the thread panicked: then the outcome says so.
        if self.jobs.send((self.shared.clone(), job)).is_err() {
            *self.shared.outcome.lock().expect("not poisoned") =
                Some(Outcome::Failed("the upload thread is gone".into()));
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            self.send(Job::Abort { id: self.id });
        }
    }
}

/// A temporary file being written.
struct Temporary {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    /// The first error: the upload fails at commit.
    error: Option<String>,
}

fn run(queue: Receiver<(Arc<Shared>, Job)>, cache: PageCache) {
    let mut open: HashMap<u64, Temporary> = HashMap::new();
    while let Ok((shared, job)) = queue.recv() {
        match job {
            Job::Write { id, target, data } => {
                let tmp = open.entry(id).or_insert_with(|| create(&target, id));
                if tmp.error.is_none() {
                    if let Some(file) = &mut tmp.file {
                        match file.write_all(&data) {
                            Ok(()) => tmp.written += data.len() as u64,
                            Err(e) => {
                                tmp.error = Some(format!("writing {}: {e}", tmp.path.display()))
                            }
                        }
                    }
                    if let Some(e) = &tmp.error {
                        // Told at once, so the server stops receiving a body it cannot store.
                        *shared.outcome.lock().expect("not poisoned") =
                            Some(Outcome::Failed(e.clone()));
                    }
                }
                shared
                    .in_flight
                    .fetch_sub(data.len() as u64, Ordering::AcqRel);
            }
            Job::Commit { id, target } => {
                let tmp = open.remove(&id).unwrap_or_else(|| create(&target, id));
                let outcome = publish(tmp, &target, &cache);
                *shared.outcome.lock().expect("not poisoned") = Some(outcome);
            }
            Job::Abort { id } => {
                if let Some(tmp) = open.remove(&id) {
                    let _ = fs::remove_file(&tmp.path);
                }
            }
        }
    }
}

/// The temporary file for upload `id`, beside `target` (same file system, so the rename is
/// atomic), with the permissions of the file it replaces.
fn create(target: &Path, id: u64) -> Temporary {
    let dir = target.parent().unwrap_or(Path::new("."));
    let path = dir.join(format!("{UPLOAD_PREFIX}{}-{id}", std::process::id()));
    let mut tmp = Temporary {
        path,
        file: None,
        written: 0,
        error: None,
    };
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp.path)
    {
        Ok(file) => {
            if let Ok(meta) = fs::metadata(target) {
                let mode = meta.permissions().mode() & 0o7777;
                let _ = file.set_permissions(fs::Permissions::from_mode(mode));
            }
            tmp.file = Some(file);
        }
        Err(e) => tmp.error = Some(format!("creating {}: {e}", tmp.path.display())),
    }
    tmp
}

fn publish(tmp: Temporary, target: &Path, cache: &PageCache) -> Outcome {
    let result = (|| {
        if let Some(e) = tmp.error {
            return Err(e);
        }
        let file = tmp.file.as_ref().ok_or("no temporary file")?;
        file.sync_all()
            .map_err(|e| format!("fsync {}: {e}", tmp.path.display()))?;
        let created = fs::symlink_metadata(target).is_err();
        cache
            .install(&tmp.path, target)
            .map_err(|e| e.to_string())?;
        Ok(Outcome::Installed {
            created,
            bytes: tmp.written,
        })
    })();
    result.unwrap_or_else(|e: String| {
        let _ = fs::remove_file(&tmp.path);
        tracing::warn!(target = %target.display(), error = %e, "PUT failed; the file is unchanged");
        Outcome::Failed(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecache::{CacheConfig, FrameArena, OpenOptions};
    use std::time::{Duration, Instant};

    fn cache() -> PageCache {
        PageCache::new(
            FrameArena::anonymous(0x1000_0000, 1 << 20).unwrap(),
            CacheConfig::default(),
        )
        .unwrap()
    }

    fn wait(upload: &Upload) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(outcome) = upload.outcome() {
                return outcome;
            }
            assert!(Instant::now() < deadline, "upload never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(UPLOAD_PREFIX))
            .collect()
    }

    #[test]
    fn an_upload_replaces_the_file_larger_than_the_cache_keeping_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.bin");
        fs::write(&target, b"old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        let cache = cache();
        let mut uploads = Uploads::start(cache.clone()).unwrap();
        let mut upload = uploads.begin(target.clone());
        let piece = vec![0x5a; 64 * 1024];
        for _ in 0..48 {
            while upload.room() < piece.len() as u64 {
                std::thread::sleep(Duration::from_millis(1));
            }
            upload.write(&piece);
        }
        assert_eq!(
            fs::read(&target).unwrap(),
            b"old",
            "published before commit"
        );
        upload.commit();
        let bytes = 48 * piece.len() as u64;
        assert_eq!(
            wait(&upload),
            Outcome::Installed {
                created: false,
                bytes
            }
        );
        assert_eq!(fs::metadata(&target).unwrap().len(), bytes);
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let file = cache.open(&target, OpenOptions::read_only()).unwrap();
        assert_eq!(file.len(), bytes);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn an_aborted_upload_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.txt");
        fs::write(&target, b"old").unwrap();
        let mut uploads = Uploads::start(cache()).unwrap();
        let mut upload = uploads.begin(target.clone());
        upload.write(b"half of the new");
        drop(upload);
        // A later upload, committed, runs after the abort on the same thread.
        let mut other = uploads.begin(dir.path().join("g.txt"));
        other.commit();
        assert_eq!(
            wait(&other),
            Outcome::Installed {
                created: true,
                bytes: 0
            }
        );
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_upload_says_why_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing-dir").join("f.txt");
        let mut uploads = Uploads::start(cache()).unwrap();
        let mut upload = uploads.begin(target.clone());
        upload.write(b"data");
        upload.commit();
        assert!(matches!(wait(&upload), Outcome::Failed(e) if e.contains("creating")));
        assert!(!target.exists());
    }
}
