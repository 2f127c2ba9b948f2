//! `zerosend serve` refuses a bad HTTPS certificate/key pair at start, before it touches a
//! NIC, with a message naming the files.

mod common;
use common::serve;

#[test]
fn mismatched_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("wrong-key.pem");
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
    let (code, stderr) = serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "zerosend: error: --tls-key {} does not match the certificate in --tls-cert {}",
            key.display(),
            cert.display()
        )),
        "{stderr}"
    );
}

#[test]
fn unreadable_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let (code, stderr) = serve(&[
        "--tls-cert",
        missing.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "zerosend: error: --tls-cert {}",
            missing.display()
        )),
        "{stderr}"
    );
}

#[test]
fn tls_flags_need_each_other() {
    let (code, stderr) = serve(&["--tls-cert", "/nonexistent.pem"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
    let (code, stderr) = serve(&["--no-plain-http"]);
    assert_eq!(code, 2, "{stderr}");
}
