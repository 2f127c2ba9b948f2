//! `zerosend serve` checks its access flags at start, before it touches a NIC: a token file
//! that holds no usable token, a metrics address the server does not have, a metrics port
//! already serving files, and certificates without their keys are refused with a message
//! that says what to change.

mod common;
use common::serve;

#[test]
fn a_put_token_needs_allow_put_and_one_word() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "  \n").unwrap();
    let path = token.to_str().unwrap();
    let (code, err) = serve(&["--put-token-file", path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow-put"), "{err}");
    let (code, err) = serve(&["--allow-put", "--put-token-file", path]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("expected one token"), "{err}");
    std::fs::write(&token, "two words\n").unwrap();
    let (_, err) = serve(&["--allow-put", "--put-token-file", path]);
    assert!(err.contains("expected one token"), "{err}");
    let (_, err) = serve(&["--allow-put", "--put-token-file", "/nonexistent/token"]);
    assert!(err.contains("--put-token-file /nonexistent/token"), "{err}");
    // A good token gets past the flags: the run ends at opening the NIC.
    std::fs::write(&token, "0123456789abcdef\n").unwrap();
    let (_, err) = serve(&["--allow-put", "--put-token-file", path]);
    assert!(err.contains("opening NIC"), "{err}");
}

#[test]
fn the_metrics_listener_must_be_ours_and_free() {
    let (_, err) = serve(&["--metrics-listen", "10.0.0.9:9464"]);
    assert!(err.contains("10.0.0.9 is not it"), "{err}");
    let (_, err) = serve(&["--metrics-listen", "80"]);
    assert!(err.contains("port 80 is already served"), "{err}");
    let (_, err) = serve(&["--metrics-listen", "10.0.0.2:x"]);
    assert!(err.contains("bad port"), "{err}");
    for ok in ["9464", "0.0.0.0:9464", "10.0.0.2:9464"] {
        let (_, err) = serve(&["--metrics-listen", ok]);
        assert!(err.contains("opening NIC"), "{ok}: {err}");
    }
}

#[test]
fn every_certificate_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (code, err) = serve(&["--tls-cert", c, "--tls-key", k, "--tls-cert", c]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("2 --tls-cert and 1 --tls-key"), "{err}");
}
