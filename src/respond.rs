//! What to answer to a GET or HEAD of a file: validators (ETag, Last-Modified), conditional
//! requests (304), single byte ranges (206, 416) with If-Range. Pure functions of the request
//! and the metadata of the *pinned snapshot*, so the headers always describe the bytes sent.

use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::{Method, Request, ResponseHead};

/// Metadata of one consistent version of a file.
#[derive(Clone, Debug)]
pub struct FileMeta {
    pub len: u64,
    /// Strong validator of this version, quoted ([`pagecache::FileIdentity::etag`]).
    pub etag: String,
    pub modified: SystemTime,
}

/// The response decided for a file request.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub status: u16,
    /// The response head, ready to send.
    pub head: Vec<u8>,
    /// The file bytes to send after the head, if any.
    pub body: Option<Range<u64>>,
}

/// Content type by file extension.
pub fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" | "log" => "text/plain; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "m3u8" => "application/vnd.apple.mpegurl",
        "ts" => "video/mp2t",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// HTTP dates have one-second resolution; compare at that resolution.
fn whole_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Weak comparison of an entity-tag list (RFC 9110 section 13.1.2) against ours.
fn etag_list_matches(list: &str, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

/// Parse a single `bytes=` range against `len` (RFC 9110 section 14.1.2).
/// `Ok(None)`: ignore the header (not bytes, several ranges, or syntax we do not serve);
/// `Err(())`: unsatisfiable (416).
fn parse_range(value: &str, len: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: answer with the whole file
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => {
            let Some(n) = num(b) else { return Ok(None) };
            if n == 0 || len == 0 {
                return Err(());
            }
            Ok(Some(len.saturating_sub(n)..len))
        }
        (false, _) => {
            let Some(start) = num(a) else { return Ok(None) };
            let end_incl = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return Ok(None),
                }
            };
            if start >= len {
                return Err(());
            }
            Ok(Some(start..end_incl.min(len - 1) + 1))
        }
    }
}

/// Decide the response to a GET or HEAD of a file with metadata `meta`.
pub fn plan_file_response(req: &Request, meta: &FileMeta, content_type: &str) -> Plan {
    let keep = if req.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let base = |status: u16, reason: &str| {
        ResponseHead::new(status, reason)
            .header("Date", http_date(SystemTime::now()))
            .header("Last-Modified", http_date(meta.modified))
            .header("ETag", &meta.etag)
            .header("Accept-Ranges", "bytes")
            .header("Connection", keep)
    };

    // Conditionals (RFC 9110 section 13.2.2): If-None-Match wins over If-Modified-Since.
    let not_modified = match req.header("If-None-Match") {
        Some(list) => etag_list_matches(list, &meta.etag),
        None => req
            .header("If-Modified-Since")
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .is_some_and(|since| whole_seconds(meta.modified) <= whole_seconds(since)),
    };
    if not_modified {
        return Plan {
            status: 304,
            head: base(304, "Not Modified").finish(),
            body: None,
        };
    }

    let mut range = None;
    if let Some(value) = req.header("Range") {
        let if_range_ok = match req.header("If-Range") {
            None => true,
            Some(v) if v.starts_with('"') || v.starts_with("W/") => v == meta.etag,
            Some(v) => httpdate::parse_http_date(v)
                .is_ok_and(|d| whole_seconds(d) == whole_seconds(meta.modified)),
        };
        if if_range_ok {
            match parse_range(value, meta.len) {
                Ok(r) => range = r,
                Err(()) => {
                    let head = base(416, "Range Not Satisfiable")
                        .header("Content-Range", format!("bytes */{}", meta.len))
                        .header("Content-Length", 0)
                        .finish();
                    return Plan {
                        status: 416,
                        head,
                        body: None,
                    };
                }
            }
        }
    }
    let head_only = req.method == Method::Head;
    match range {
        Some(r) => {
            let head = base(206, "Partial Content")
                .header("Content-Type", content_type)
                .header(
                    "Content-Range",
                    format!("bytes {}-{}/{}", r.start, r.end - 1, meta.len),
                )
                .header("Content-Length", r.end - r.start)
                .finish();
            Plan {
                status: 206,
                head,
                body: (!head_only).then_some(r),
            }
        }
        None => {
            let head = base(200, "OK")
                .header("Content-Type", content_type)
                .header("Content-Length", meta.len)
                .finish();
            Plan {
                status: 200,
                head,
                body: (!head_only && meta.len > 0).then_some(0..meta.len),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, Limits, Parsed};
    use std::time::Duration;

    fn req(s: &str) -> Request {
        match parse_request(s.as_bytes(), &Limits::default()).unwrap() {
            Parsed::Complete { request, .. } => request,
            Parsed::Partial => panic!(),
        }
    }

    fn meta() -> FileMeta {
        FileMeta {
            len: 1000,
            etag: String::from("\"7-3-3e8\""),
            modified: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    fn head_str(p: &Plan) -> String {
        String::from_utf8(p.head.clone()).unwrap()
    }

    #[test]
    fn full_get_and_head() {
        let p = plan_file_response(&req("GET /f HTTP/1.1\r\n\r\n"), &meta(), "text/plain");
        assert_eq!((p.status, p.body.clone()), (200, Some(0..1000)));
        let h = head_str(&p);
        assert!(h.contains("Content-Length: 1000\r\n") && h.contains("ETag: \"7-3-3e8\"\r\n"));
        assert!(h.contains("Last-Modified: Tue, 14 Nov 2023 22:13:20 GMT\r\n"));
        let p = plan_file_response(&req("HEAD /f HTTP/1.1\r\n\r\n"), &meta(), "text/plain");
        assert_eq!((p.status, p.body.clone()), (200, None));
        assert!(head_str(&p).contains("Content-Length: 1000\r\n"));
    }

    #[test]
    fn conditional_requests() {
        let m = meta();
        let inm = format!(
            "GET /f HTTP/1.1\r\nIf-None-Match: \"x\", {}\r\n\r\n",
            m.etag
        );
        assert_eq!(plan_file_response(&req(&inm), &m, "x").status, 304);
        let other = "GET /f HTTP/1.1\r\nIf-None-Match: \"other\"\r\n\r\n";
        assert_eq!(plan_file_response(&req(other), &m, "x").status, 200);
        let ims = "GET /f HTTP/1.1\r\nIf-Modified-Since: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n";
        assert_eq!(plan_file_response(&req(ims), &m, "x").status, 304);
        let older = "GET /f HTTP/1.1\r\nIf-Modified-Since: Tue, 14 Nov 2023 22:13:19 GMT\r\n\r\n";
        assert_eq!(plan_file_response(&req(older), &m, "x").status, 200);
        let both = "GET /f HTTP/1.1\r\nIf-None-Match: \"other\"\r\nIf-Modified-Since: Tue, 14 Nov 2023 22:13:20 GMT\r\n\r\n";
        assert_eq!(
            plan_file_response(&req(both), &m, "x").status,
            200,
            "If-None-Match wins"
        );
    }

    #[test]
    fn ranges() {
        let m = meta();
        let r = |h: &str| {
            plan_file_response(
                &req(&format!("GET /f HTTP/1.1\r\nRange: {h}\r\n\r\n")),
                &m,
                "x",
            )
        };
        let p = r("bytes=0-99");
        assert_eq!((p.status, p.body.clone()), (206, Some(0..100)));
        assert!(head_str(&p).contains("Content-Range: bytes 0-99/1000\r\n"));
        assert_eq!(r("bytes=990-").body, Some(990..1000));
        assert_eq!(r("bytes=-10").body, Some(990..1000));
        assert_eq!(r("bytes=-5000").body, Some(0..1000));
        assert_eq!(r("bytes=500-5000").body, Some(500..1000));
        let p = r("bytes=1000-");
        assert_eq!(p.status, 416);
        assert!(head_str(&p).contains("Content-Range: bytes */1000\r\n"));
        assert_eq!(
            r("bytes=0-1,5-6").status,
            200,
            "multiple ranges: whole file"
        );
        assert_eq!(r("items=0-1").status, 200);
        assert_eq!(r("bytes=9-1").status, 200, "invalid syntax is ignored");
    }

    #[test]
    fn if_range() {
        let m = meta();
        let with = |ir: &str| {
            plan_file_response(
                &req(&format!(
                    "GET /f HTTP/1.1\r\nRange: bytes=0-9\r\nIf-Range: {ir}\r\n\r\n"
                )),
                &m,
                "x",
            )
            .status
        };
        assert_eq!(with(&m.etag), 206);
        assert_eq!(with("\"stale\""), 200);
        assert_eq!(with("Tue, 14 Nov 2023 22:13:20 GMT"), 206);
        assert_eq!(with("Tue, 14 Nov 2023 22:13:21 GMT"), 200);
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("/a/b.HTML"), "text/html; charset=utf-8");
        assert_eq!(content_type("/video.mp4"), "video/mp4");
        assert_eq!(content_type("/noext"), "application/octet-stream");
    }
}
