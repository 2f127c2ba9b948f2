//! A throwaway PKI for the HTTPS tests, made with openssl on the host for each run.

use std::path::PathBuf;
use std::process::Command;

use crate::netns::GUEST_IP;
use crate::Nic;

/// The name only the second certificate is valid for.
pub const SNI_NAME: &str = "media.zerosend.test";

/// A throwaway CA and two server certificates signed by it: `cert.pem`/`key.pem` for the
/// guest's address (and `zerosend.test`), `media-cert.pem`/`media-key.pem` for
/// [`SNI_NAME`] only. Deleted when dropped.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Made with openssl on the host, in a directory of this process and `nic`.
    pub fn make(nic: Nic) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "zs-https-{}-{}-pki",
            std::process::id(),
            nic.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let o = Command::new("openssl")
                .current_dir(&dir)
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "2"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-subj",
                    "/CN=zs test CA",
                ],
            ]
            .concat(),
        );
        // The default certificate, and a second one (SNI) for another name only.
        for (prefix, san) in [
            ("", format!("IP:{GUEST_IP},DNS:zerosend.test")),
            ("media-", format!("DNS:{SNI_NAME}")),
        ] {
            std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\n")).unwrap();
            let (key, csr, cert) = (
                format!("{prefix}key.pem"),
                format!("{prefix}srv.csr"),
                format!("{prefix}cert.pem"),
            );
            openssl(
                &[
                    &["req", "-nodes"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", "/CN=zerosend.test"],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &cert,
            ]);
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The CA certificate's path, for `curl --cacert`.
    pub fn ca(&self) -> String {
        self.path("ca.pem").to_str().unwrap().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
