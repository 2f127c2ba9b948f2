//! HTTPS settings of `zerosend serve`: the certificate chain and key from PEM files, checked
//! against each other at start, and the rustls server configuration the stack's TLS
//! listener runs (TLS 1.3 with AES-GCM only: what netstack's record layer implements).
//!
//! Several certificates can be served (SNI): each pair of `--tls-cert`/`--tls-key` is
//! offered to clients asking for a name its certificate is valid for (checked by webpki,
//! as a client would: SAN DNS names, wildcards); the first pair goes to clients that send no
//! name or one no certificate names.
//!
//! The certificates are served through a resolver whose keys can be swapped: the server
//! loop looks at the files' modification times now and then and reloads them when they
//! change (a bad new pair is refused with a warning and the old one kept).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// `--tls-cert`, `--tls-key`, `--tls-port`, loaded and checked.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub port: u16,
    pub config: Arc<rustls::ServerConfig>,
    /// The certificates in use; [`Certificates::reload_if_changed`] replaces them.
    pub certificate: Arc<Certificates>,
}

impl TlsOptions {
    /// Reads and checks each chain and key (`pairs`, the first the default), and builds the
    /// configuration. Every error names the file (and flag) it is about.
    pub fn load(pairs: &[(PathBuf, PathBuf)], port: u16) -> Result<TlsOptions> {
        let provider = provider();
        if pairs.is_empty() {
            bail!("no --tls-cert/--tls-key pair");
        }
        let pairs = pairs
            .iter()
            .map(|(cert, key)| ReloadableCert::load(cert, key, &provider))
            .collect::<Result<Vec<_>>>()?;
        let certificate = Arc::new(Certificates { pairs });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 configuration")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Stateless tickets for resumption: netstack sends them before it takes the
        // connection's secrets from rustls, so they work with its record layer.
        config.ticketer = rustls::crypto::ring::Ticketer::new().context("session tickets")?;
        Ok(TlsOptions {
            port,
            config: Arc::new(config),
            certificate,
        })
    }
}

/// ring's provider with only the suites the stack's record layer implements; AES-128-GCM
/// first, the faster of the two.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    Arc::new(CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
        ..rustls::crypto::ring::default_provider()
    })
}

/// Reads a PEM certificate chain (end-entity first) and a PEM private key and checks that
/// the key belongs to the certificate.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey> {
    std::fs::metadata(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
    std::fs::metadata(key).with_context(|| format!("--tls-key {}", key.display()))?;
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow!(
                "--tls-cert {}: not a PEM certificate file: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        bail!(
            "--tls-cert {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            cert.display()
        );
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow!(
            "--tls-key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}",
            key.display()
        )
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| anyhow!("--tls-key {}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            // The key type cannot say its public key: rustls cannot compare, nor can we.
            tracing::warn!(
                cert = %cert.display(),
                key = %key.display(),
                "cannot check that the TLS key matches the certificate"
            );
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => bail!(
            "--tls-key {} does not match the certificate in --tls-cert {} (their public keys differ)",
            key.display(),
            cert.display()
        ),
        Err(e) => bail!("--tls-cert {}: bad certificate: {e}", cert.display()),
    }
}

/// The server's certificate, replaceable while serving (new handshakes get the new one).
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// Modification times of the two files when they were read.
    stamps: (Option<SystemTime>, Option<SystemTime>),
}

fn stamps(cert: &Path, key: &Path) -> (Option<SystemTime>, Option<SystemTime>) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(cert), mtime(key))
}

impl ReloadableCert {
    fn load(cert: &Path, key: &Path, provider: &Arc<CryptoProvider>) -> Result<Self> {
        let stamps = stamps(cert, key);
        let certified = load_certified_key(cert, key, provider)?;
        Ok(ReloadableCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider: Arc::clone(provider),
            current: RwLock::new(Loaded {
                key: Arc::new(certified),
                stamps,
            }),
        })
    }

    /// Reloads the pair when either file changed since it was read. Returns `Ok(true)` when
    /// a new pair is in use; an error (the old pair stays) when the new files are bad, e.g.
    /// the certificate was replaced and the key not yet.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let now = stamps(&self.cert_path, &self.key_path);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if now == current.stamps {
            return Ok(false);
        }
        // Remember the attempt either way: a bad pair is reported once, not every check.
        current.stamps = now;
        let certified = load_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        current.key = Arc::new(certified);
        Ok(true)
    }
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadableCert {
    fn key(&self) -> Arc<CertifiedKey> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&current.key)
    }
}

/// Every certificate served, the default first; chosen per handshake by the name the client
/// asks for (SNI).
#[derive(Debug)]
pub struct Certificates {
    pairs: Vec<ReloadableCert>,
}

impl Certificates {
    /// [`ReloadableCert::reload_if_changed`] for each pair: whether any new pair is in use,
    /// or the first error (every pair is still looked at).
    pub fn reload_if_changed(&self) -> Result<bool> {
        let mut changed = false;
        let mut first_error = None;
        for pair in &self.pairs {
            match pair.reload_if_changed() {
                Ok(c) => changed |= c,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(changed), Err)
    }

    /// The pair for a client asking for `name`: the first whose end-entity certificate is
    /// valid for it, else the default (the first pair).
    fn choose(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let wanted = name.and_then(|n| ServerName::try_from(n).ok());
        if let Some(wanted) = &wanted {
            for pair in &self.pairs {
                let key = pair.key();
                if valid_for(&key, wanted) {
                    return key;
                }
            }
        }
        self.pairs[0].key()
    }
}

/// Whether `key`'s end-entity certificate names `name` (SAN, webpki's rules).
fn valid_for(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.end_entity_cert()
        .ok()
        .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
        .is_some_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM.
    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn matching_pair_loads_with_http11_and_tickets() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("a.test");
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let tls = TlsOptions::load(&[(c, k)], 443).unwrap();
        assert_eq!(tls.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(tls.config.ticketer.enabled());
        assert_eq!(tls.config.crypto_provider().cipher_suites.len(), 2);
    }

    #[test]
    fn mismatched_key_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair("a.test");
        let (_, other_key) = pair("b.test");
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "other-key.pem", &other_key);
        let e = format!(
            "{:#}",
            TlsOptions::load(&[(c.clone(), k.clone())], 443).unwrap_err()
        );
        assert!(e.contains("does not match the certificate"), "{e}");
        assert!(e.contains(&*k.to_string_lossy()), "{e}");
        assert!(e.contains(&*c.to_string_lossy()), "{e}");
    }

    #[test]
    fn unreadable_and_invalid_pem_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("a.test");
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let junk = write(dir.path(), "junk.pem", "not pem at all\n");
        let missing = dir.path().join("missing.pem");
        let err = |c: &Path, k: &Path| {
            let pair = (c.to_path_buf(), k.to_path_buf());
            format!("{:#}", TlsOptions::load(&[pair], 443).unwrap_err())
        };
        let e = err(&missing, &k);
        assert!(
            e.starts_with("--tls-cert ") && e.contains("missing.pem"),
            "{e}"
        );
        let e = err(&junk, &k);
        assert!(
            e.starts_with("--tls-cert ") && e.contains("junk.pem"),
            "{e}"
        );
        let e = err(&c, &junk);
        assert!(e.starts_with("--tls-key ") && e.contains("junk.pem"), "{e}");
        // A certificate file given as the key (and vice versa).
        let e = err(&c, &c);
        assert!(e.starts_with("--tls-key "), "{e}");
        let e = err(&k, &k);
        assert!(e.starts_with("--tls-cert "), "{e}");
    }

    #[test]
    fn reload_takes_a_new_pair_and_keeps_the_old_one_on_a_bad_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("a.test");
        let c = write(dir.path(), "cert.pem", &cert);
        let k = write(dir.path(), "key.pem", &key);
        let tls = TlsOptions::load(&[(c.clone(), k.clone())], 443).unwrap();
        assert!(!tls.certificate.reload_if_changed().unwrap());
        let current = |tls: &TlsOptions| tls.certificate.choose(None).cert[0].clone();
        let first = current(&tls);
        // Modification times can be coarse: force a visible change.
        let later = SystemTime::now() + std::time::Duration::from_secs(10);
        let (cert2, key2) = pair("b.test");
        write(dir.path(), "cert.pem", &cert2);
        std::fs::File::options()
            .write(true)
            .open(&c)
            .unwrap()
            .set_modified(later)
            .unwrap();
        // Certificate replaced, key not yet: refused, the old pair stays.
        assert!(tls.certificate.reload_if_changed().is_err());
        assert_eq!(current(&tls), first);
        write(dir.path(), "key.pem", &key2);
        std::fs::File::options()
            .write(true)
            .open(&k)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(tls.certificate.reload_if_changed().unwrap());
        assert_ne!(current(&tls), first);
    }

    /// SNI: each name gets the certificate that names it (wildcards as a client checks
    /// them); no name, an unknown one or an IP literal gets the first pair.
    #[test]
    fn sni_chooses_the_certificate_that_names_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut pairs = Vec::new();
        let mut ders = Vec::new();
        for (i, names) in [vec!["a.test"], vec!["b.test", "*.media.test"]]
            .iter()
            .enumerate()
        {
            let c = rcgen::generate_simple_self_signed(
                names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            ders.push(c.cert.der().clone());
            pairs.push((
                write(dir.path(), &format!("cert{i}.pem"), &c.cert.pem()),
                write(
                    dir.path(),
                    &format!("key{i}.pem"),
                    &c.signing_key.serialize_pem(),
                ),
            ));
        }
        let tls = TlsOptions::load(&pairs, 443).unwrap();
        let served = |name: Option<&str>| tls.certificate.choose(name).cert[0].clone();
        assert_eq!(served(Some("a.test")), ders[0]);
        assert_eq!(served(Some("b.test")), ders[1]);
        assert_eq!(served(Some("video.media.test")), ders[1]);
        assert_eq!(
            served(Some("x.video.media.test")),
            ders[0],
            "one label only"
        );
        assert_eq!(served(Some("c.test")), ders[0]);
        assert_eq!(served(None), ders[0]);
        // A mismatched second pair is refused at start, naming its files.
        let mixed = vec![pairs[0].clone(), (pairs[1].0.clone(), pairs[0].1.clone())];
        let e = format!("{:#}", TlsOptions::load(&mixed, 443).unwrap_err());
        assert!(e.contains("cert1.pem") && e.contains("key0.pem"), "{e}");
    }
}
