//! TLS for the `mqtts` and `wss` listeners: rustls on the ring provider, TLS 1.2 and 1.3,
//! optional client certificates (mutual TLS), and certificates that reload when their files
//! change.
//!
//! Reload: a task reads the configured files every [`RELOAD_POLL`] and, when their bytes
//! changed, builds a new `ServerConfig` and swaps it in. New handshakes use the new one; open
//! connections keep the session they made. A change that does not load (a key written before
//! its certificate, a bad file) is logged and the previous configuration stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertUsername, Tls};
use crate::ServerError;

/// How often the certificate files are checked for changes.
pub(crate) const RELOAD_POLL: Duration = Duration::from_secs(2);

/// The current TLS configuration, shared by the TLS listeners and the reload task.
pub(crate) struct TlsState {
    current: RwLock<Arc<ServerConfig>>,
    cert_username: CertUsername,
    /// The `[tls]` table in force and the bytes of its files, which the reload task compares
    /// with what the files hold now; a configuration reload replaces both ([`TlsState::install`]).
    watched: Mutex<(Tls, Snapshot)>,
}

/// A `[tls]` table whose files were read and built into a configuration, ready to install.
pub(crate) struct Prepared {
    tls: Tls,
    files: Snapshot,
    config: Arc<ServerConfig>,
}

impl TlsState {
    /// Loads the files named by `[tls]`; the error names the file at fault.
    pub(crate) fn load(tls: &Tls) -> Result<Arc<TlsState>, ServerError> {
        let Prepared { tls, files, config } = TlsState::prepare(tls)?;
        let state = TlsState {
            current: RwLock::new(config),
            cert_username: tls.cert_username,
            watched: Mutex::new((tls, files)),
        };
        Ok(Arc::new(state))
    }

    /// Reads and builds a `[tls]` table without using it (a reload checks before it applies).
    pub(crate) fn prepare(tls: &Tls) -> Result<Prepared, ServerError> {
        let files = Snapshot::read(tls)?;
        let config = build(tls, &files)?;
        Ok(Prepared {
            tls: tls.clone(),
            files,
            config,
        })
    }

    /// Puts a prepared table in force: new handshakes use it, and the reload task watches its
    /// files from now on. (`cert_username` is taken at start only.)
    pub(crate) fn install(&self, p: Prepared) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        self.replace(p.config);
        *watched = (p.tls, p.files);
    }

    /// Installs `p` only if the watched table is still `expected`: the file poll builds
    /// outside the lock, and a configuration reload may install other paths meanwhile, which
    /// the poll's older table must not overwrite. Checked and installed under one lock.
    fn install_if_still(&self, expected: &Tls, p: Prepared) -> bool {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.0 != *expected {
            return false;
        }
        self.replace(p.config);
        *watched = (p.tls, p.files);
        true
    }

    /// The acceptor for a new connection (with the configuration in force now).
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        tokio_rustls::TlsAcceptor::from(config)
    }

    fn replace(&self, config: Arc<ServerConfig>) {
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    /// The user name a verified client certificate gives, per `tls.cert_username`. rustls
    /// shows peer certificates only once they are verified against `tls.client_ca`.
    pub(crate) fn cert_user(&self, conn: &rustls::ServerConnection) -> Option<Arc<str>> {
        let leaf = conn.peer_certificates()?.first()?;
        let name = match self.cert_username {
            CertUsername::None => return None,
            CertUsername::Cn => names::common_name(leaf.as_ref())?,
            CertUsername::San => names::first_san(leaf.as_ref())?,
        };
        Some(name.into())
    }
}

/// The bytes of the files a configuration was built from.
#[derive(PartialEq)]
pub(crate) struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Snapshot {
    fn read(tls: &Tls) -> Result<Snapshot, ServerError> {
        Ok(Snapshot {
            cert: read(&tls.cert)?,
            key: read(&tls.key)?,
            client_ca: tls.client_ca.as_deref().map(read).transpose()?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| tls_error(path, format!("cannot read: {e}")))
}

fn tls_error(path: &Path, message: impl Into<String>) -> ServerError {
    ServerError::Tls {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A rustls server configuration from the files' bytes.
fn build(tls: &Tls, files: &Snapshot) -> Result<Arc<ServerConfig>, ServerError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(&tls.cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(&tls.cert, "holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| tls_error(&tls.key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match (&tls.client_ca, &files.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|e| tls_error(path, format!("not a PEM certificate: {e}")))?;
                roots
                    .add(ca)
                    .map_err(|e| tls_error(path, format!("not a usable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(tls_error(path, "holds no PEM certificate"));
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone());
            let builder = if tls.require_client_cert {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder
                .build()
                .map_err(|e| tls_error(path, format!("cannot verify clients with it: {e}")))?
        }
        _ => WebPkiClientVerifier::no_client_auth(),
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_error(&tls.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&tls.key, format!("does not fit the certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// Watches the certificate files and swaps in a new configuration when they change, until
/// `stop` is set.
pub(crate) async fn reload_loop(
    state: Arc<TlsState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failed: Option<PathBuf> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let tls = state
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        let read = {
            let tls = tls.clone();
            tokio::task::spawn_blocking(move || Snapshot::read(&tls)).await
        };
        let now = match read {
            Ok(Ok(now)) => now,
            Ok(Err(e)) => {
                warn_once(&mut failed, &e);
                continue;
            }
            Err(_) => continue,
        };
        {
            let watched = state.watched.lock().unwrap_or_else(|e| e.into_inner());
            // Unchanged, or a configuration reload replaced the table meanwhile.
            if watched.1 == now || watched.0 != tls {
                continue;
            }
        }
        match build(&tls, &now) {
            Ok(config) => {
                let prepared = Prepared {
                    tls: tls.clone(),
                    files: now,
                    config,
                };
                if state.install_if_still(&tls, prepared) {
                    failed = None;
                    tracing::info!(cert = %tls.cert.display(), "TLS certificates reloaded");
                }
            }
            Err(e) => warn_once(&mut failed, &e),
        }
    }
}

/// Logs a reload failure once per file until a reload succeeds (a half-written pair of files
/// is retried at the next poll).
fn warn_once(failed: &mut Option<PathBuf>, e: &ServerError) {
    let path = match e {
        ServerError::Tls { path, .. } => Some(path.clone()),
        _ => None,
    };
    if *failed != path {
        tracing::warn!(error = %e, "TLS certificates not reloaded: the previous ones stay in use");
        *failed = path;
    }
}

/// Names in an X.509 certificate: the subject's common name and the subject alternative
/// names, read with a small DER walker (rustls-webpki verifies certificates but shows no
/// subject fields). Every read is bounds-checked; a certificate it cannot walk has no name.
pub mod names {
    /// OID 2.5.4.3 (commonName), DER content.
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    /// OID 2.5.29.17 (subjectAltName), DER content.
    const SAN: &[u8] = &[0x55, 0x1D, 0x11];

    /// One DER element: (tag, content, the rest after it).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7F);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    /// The elements of a constructed value's content.
    fn elements(mut content: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
        std::iter::from_fn(move || {
            let (tag, value, rest) = tlv(content)?;
            content = rest;
            Some((tag, value))
        })
    }

    /// TBSCertificate's fields: (subject, extensions) contents.
    fn subject_and_extensions(cert: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
        let (0x30, cert, _) = tlv(cert)? else {
            return None;
        };
        let (0x30, tbs, _) = tlv(cert)? else {
            return None;
        };
        let mut fields = elements(tbs).peekable();
        // [0] version, then serial, signature, issuer, validity, subject.
        if fields.peek().map(|f| f.0) == Some(0xA0) {
            fields.next();
        }
        let mut fields = fields.skip(4);
        let (0x30, subject) = fields.next()? else {
            return None;
        };
        let extensions = fields.find(|f| f.0 == 0xA3).map(|f| f.1);
        Some((subject, extensions))
    }

    /// A directory string as text (UTF8String, PrintableString, IA5String, T61String).
    fn text(tag: u8, value: &[u8]) -> Option<String> {
        match tag {
            0x0C | 0x13 | 0x16 | 0x14 => std::str::from_utf8(value).ok().map(str::to_string),
            _ => None,
        }
    }

    /// The subject's (first) common name.
    pub fn common_name(cert: &[u8]) -> Option<String> {
        let (subject, _) = subject_and_extensions(cert)?;
        for (tag, set) in elements(subject) {
            if tag != 0x31 {
                continue;
            }
            for (tag, attribute) in elements(set) {
                if tag != 0x30 {
                    continue;
                }
                let mut parts = elements(attribute);
                if parts.next() == Some((0x06, CN)) {
                    let (tag, value) = parts.next()?;
                    return text(tag, value).filter(|n| !n.is_empty());
                }
            }
        }
        None
    }

    /// The first DNS name of the subject alternative names, else the first e-mail address.
    pub fn first_san(cert: &[u8]) -> Option<String> {
        let (_, extensions) = subject_and_extensions(cert)?;
        let (0x30, list, _) = tlv(extensions?)? else {
            return None;
        };
        for (tag, extension) in elements(list) {
            if tag != 0x30 {
                continue;
            }
            let mut parts = elements(extension);
            if parts.next() != Some((0x06, SAN)) {
                continue;
            }
            // An optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            let (_, value) = parts.find(|p| p.0 == 0x04)?;
            let (0x30, general, _) = tlv(value)? else {
                return None;
            };
            let names: Vec<(u8, &[u8])> = elements(general).collect();
            // [2] dNSName, then [1] rfc822Name, both IA5String.
            for wanted in [0x82, 0x81] {
                if let Some((_, n)) = names.iter().find(|(t, n)| *t == wanted && !n.is_empty()) {
                    return std::str::from_utf8(n).ok().map(str::to_string);
                }
            }
            return None;
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::names;

    fn cert(cn: &str, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "FerryMQ tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_and_first_san_are_read_from_the_certificate() {
        let dns = rcgen::SanType::DnsName("device-7.example".try_into().unwrap());
        let mail = rcgen::SanType::Rfc822Name("ops@example.com".try_into().unwrap());
        let c = cert("sensor-42", vec![mail.clone(), dns]);
        assert_eq!(names::common_name(&c).as_deref(), Some("sensor-42"));
        assert_eq!(names::first_san(&c).as_deref(), Some("device-7.example"));
        let c = cert("ünïcode ✓", vec![mail]);
        assert_eq!(names::common_name(&c).as_deref(), Some("ünïcode ✓"));
        assert_eq!(names::first_san(&c).as_deref(), Some("ops@example.com"));
        assert_eq!(names::first_san(&cert("x", vec![])), None);
    }

    #[test]
    fn truncated_or_garbage_certificates_have_no_name() {
        let c = cert("sensor-42", vec![]);
        for cut in 0..c.len() {
            // Never panics; a cut certificate mostly yields nothing.
            let _ = names::common_name(&c[..cut]);
            let _ = names::first_san(&c[..cut]);
        }
        assert_eq!(
            names::common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]),
            None
        );
        assert_eq!(names::common_name(&[]), None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod reload_race {
    use super::*;

    /// A self-signed certificate and key for 127.0.0.1, written under `dir` as `name`.pem/key.
    fn files(dir: &std::path::Path, name: &str) -> Tls {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        Tls {
            cert: c,
            key: k,
            client_ca: None,
            require_client_cert: false,
            cert_username: CertUsername::None,
        }
    }

    /// Review suspicion (issue 13): the file poll built new certificates outside the lock and
    /// installed them after, so a configuration reload that installed other paths in between
    /// was overwritten by the poll's older table. The poll now installs only if its table is
    /// still the watched one.
    #[test]
    fn the_file_poll_does_not_overwrite_paths_a_config_reload_installed_meanwhile() {
        let dir = std::env::temp_dir().join(format!("ferrymq-tls-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = files(&dir, "old");
        let new = files(&dir, "new");
        let state = TlsState::load(&old).unwrap();
        // The poll read the old table and built from its (changed) files ...
        let polled = TlsState::prepare(&old).unwrap();
        // ... while a configuration reload installed the new paths.
        state.install(TlsState::prepare(&new).unwrap());
        assert!(!state.install_if_still(&old, polled));
        assert_eq!(state.watched.lock().unwrap().0, new);
        // Without a reload in between the poll installs.
        let polled = TlsState::prepare(&new).unwrap();
        assert!(state.install_if_still(&new, polled));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
