//! Mapping request paths to files under `--root`, so that no path escapes it: `..` segments
//! (also percent-encoded), NUL bytes, and symlinks that resolve outside the root are refused.

use std::path::{Component, Path, PathBuf};

use percent_encoding::percent_decode_str;

use crate::http::HttpError;

/// The directory being served, canonicalised once at start-up.
#[derive(Clone, Debug)]
pub struct ServeRoot {
    root: PathBuf,
}

impl ServeRoot {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(ServeRoot { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The file a percent-encoded request path names. `for_write` allows a file that does not
    /// exist yet (PUT), as long as its directory exists inside the root.
    pub fn resolve(&self, raw_path: &str, for_write: bool) -> Result<PathBuf, HttpError> {
        let forbidden = HttpError::new(403, "Forbidden");
        let not_found = HttpError::new(404, "Not Found");
        let decoded = percent_decode_str(raw_path)
            .decode_utf8()
            .map_err(|_| HttpError::new(400, "Bad Request"))?;
        if decoded.contains('\0') || decoded.contains('\\') {
            return Err(HttpError::new(400, "Bad Request"));
        }
        let relative = Path::new(decoded.trim_start_matches('/'));
        let mut joined = self.root.clone();
        for c in relative.components() {
            match c {
                Component::Normal(part) => joined.push(part),
                Component::CurDir => {}
                // `..`, or anything absolute after decoding: refuse rather than normalise.
                _ => return Err(forbidden),
            }
        }
        let canonical = match joined.canonicalize() {
            Ok(p) => p,
            Err(_) if for_write => {
                let parent = joined.parent().ok_or(forbidden.clone())?;
                let name = joined.file_name().ok_or(forbidden.clone())?;
                parent
                    .canonicalize()
                    .map_err(|_| not_found.clone())?
                    .join(name)
            }
            Err(_) => return Err(not_found),
        };
        // Symlinks are followed by canonicalize; the target must still be inside the root.
        if !canonical.starts_with(&self.root) {
            return Err(forbidden);
        }
        // Uploads in progress are nobody's to read or overwrite.
        let is_upload = canonical.file_name().is_some_and(|n| {
            n.to_string_lossy()
                .starts_with(crate::upload::UPLOAD_PREFIX)
        });
        if is_upload {
            return Err(if for_write { forbidden } else { not_found });
        }
        if canonical.is_dir() {
            let index = canonical.join("index.html");
            return if !for_write && index.is_file() {
                Ok(index)
            } else {
                Err(forbidden)
            };
        }
        Ok(canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (PathBuf, ServeRoot) {
        let base = std::env::temp_dir().join(format!(
            "zs-root-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("www/sub")).unwrap();
        std::fs::write(base.join("www/a.txt"), "a").unwrap();
        std::fs::write(base.join("www/sub/b.txt"), "b").unwrap();
        std::fs::write(base.join("secret.txt"), "s").unwrap();
        std::os::unix::fs::symlink(base.join("secret.txt"), base.join("www/escape")).unwrap();
        std::os::unix::fs::symlink(base.join("www/a.txt"), base.join("www/inside")).unwrap();
        let root = ServeRoot::new(&base.join("www")).unwrap();
        (base, root)
    }

    #[test]
    fn resolves_files_inside_the_root() {
        let (base, root) = fixture();
        let www = base.join("www").canonicalize().unwrap();
        assert_eq!(root.resolve("/a.txt", false).unwrap(), www.join("a.txt"));
        assert_eq!(
            root.resolve("/sub/b.txt", false).unwrap(),
            www.join("sub/b.txt")
        );
        assert_eq!(
            root.resolve("/sub/%62.txt", false).unwrap(),
            www.join("sub/b.txt")
        );
        assert_eq!(root.resolve("/inside", false).unwrap(), www.join("a.txt"));
        assert_eq!(root.resolve("/new.bin", true).unwrap(), www.join("new.bin"));
        assert_eq!(root.resolve("/missing", false).unwrap_err().status, 404);
        assert_eq!(
            root.resolve("/nodir/new.bin", true).unwrap_err().status,
            404
        );
    }

    #[test]
    fn nothing_escapes_the_root() {
        let (_base, root) = fixture();
        for p in [
            "/../secret.txt",
            "/sub/../../secret.txt",
            "/%2e%2e/secret.txt",
            "/%2E%2E%2Fsecret.txt",
            "/sub/%2e%2e/%2e%2e/secret.txt",
            "/escape",
            "/sub",
        ] {
            assert_eq!(root.resolve(p, false).unwrap_err().status, 403, "{p}");
        }
        assert_eq!(root.resolve("/a%00.txt", false).unwrap_err().status, 400);
        assert_eq!(root.resolve("/%ff", false).unwrap_err().status, 400);
        assert_eq!(root.resolve("/../evil", true).unwrap_err().status, 403);
    }
}
