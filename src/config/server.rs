//! `[server]`: the public and admin listeners, their timeouts, trusted proxies and TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::file::ServerFile;
use super::parse::{parse_addr, resolve_path, secs};
use super::Problems;

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub h2c: bool,
    pub request_header_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// Request head to the whole body, for bodies read before forwarding.
    pub body_timeout: Duration,
    /// Longest gap between two chunks of a streamed request body.
    pub body_idle_timeout: Duration,
    /// Longest a write to the client may wait.
    pub send_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub grace_period: Duration,
    pub shutdown_timeout: Duration,
    pub tls: Option<TlsSettings>,
}

#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate and key, loaded and matched (present whenever the settings are valid).
    pub server_config: Option<Arc<rustls::ServerConfig>>,
    /// Problems that do not stop keygate (an expired or not yet valid certificate).
    pub warnings: Vec<String>,
}

/// A loaded listener certificate and key, with warnings that do not stop keygate.
type LoadedTls = (Arc<rustls::ServerConfig>, Vec<String>);

/// Load the public listener's certificate chain and key and check that they belong together;
/// an error names the option at fault. Warns on a certificate outside its validity period.
fn load_tls(cert_file: &Path, key_file: &Path) -> Result<LoadedTls, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const CERT: &str = "server.tls.cert_file";
    const KEY: &str = "server.tls.key_file";
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                CERT,
                format!("{}: not a PEM certificate: {e}", cert_file.display()),
            )
        })?;
    let Some(leaf) = certs.first() else {
        return Err((
            CERT,
            format!("{}: no PEM certificate found", cert_file.display()),
        ));
    };
    let mut warnings = Vec::new();
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, parsed)) => {
            let validity = parsed.validity();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if now > validity.not_after.timestamp() {
                warnings.push(format!(
                    "{CERT}: the certificate expired on {}",
                    validity.not_after
                ));
            } else if now < validity.not_before.timestamp() {
                warnings.push(format!(
                    "{CERT}: the certificate is not valid before {}",
                    validity.not_before
                ));
            }
        }
        Err(e) => {
            return Err((
                CERT,
                format!(
                    "{}: not a valid X.509 certificate: {e}",
                    cert_file.display()
                ),
            ))
        }
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            KEY,
            format!("{}: no PEM private key found: {e}", key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| (CERT, format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                KEY,
                format!(
                    "{}: cannot be used with the certificate in {CERT}: {e}",
                    key_file.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), warnings))
}

/// Two listen addresses that would end up on one socket: Pingora shares a socket between
/// listeners with the same address, and a wildcard address overlaps every IP on its port.
/// Port 0 (any free port) collides only with the identical address.
fn listeners_collide(a: &SocketAddr, b: &SocketAddr) -> bool {
    if a == b {
        return true;
    }
    a.port() != 0 && a.port() == b.port() && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl ServerSettings {
    /// Validate `[server]`: the public listen address (when it parses, for the sections that
    /// derive URLs from it) and the settings (`None` when a listen address is unusable).
    pub(crate) fn from_file(
        f: &ServerFile,
        base: &Path,
        problems: &mut Problems,
    ) -> (Option<SocketAddr>, Option<ServerSettings>) {
        // [server]
        let listen = parse_addr("server.listen (KEYGATE_LISTEN)", &f.listen, problems);
        let admin_listen = parse_addr(
            "server.admin_listen (KEYGATE_ADMIN_LISTEN)",
            &f.admin_listen,
            problems,
        );
        if let (Some(public), Some(admin)) = (&listen, &admin_listen) {
            if listeners_collide(public, admin) {
                problems.push(
                    "server.admin_listen (KEYGATE_ADMIN_LISTEN)",
                    format!(
                        "must not share a port with server.listen ({public}): /metrics and /ready \
                     would be served on the public listener"
                    ),
                );
            }
        }
        if f.threads == 0 {
            problems.push("server.threads", "must be at least 1");
        }
        for (name, value) in [
            (
                "server.request_header_timeout_secs",
                f.request_header_timeout_secs,
            ),
            ("server.body_timeout_secs", f.body_timeout_secs),
            ("server.body_idle_timeout_secs", f.body_idle_timeout_secs),
            ("server.send_timeout_secs", f.send_timeout_secs),
        ] {
            if value == 0 {
                problems.push(name, "must be at least 1");
            }
        }
        let mut trusted_proxies = Vec::new();
        for raw in &f.trusted_proxies {
            let parsed = raw
                .parse::<IpNet>()
                .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => trusted_proxies.push(n),
                Err(_) => problems.push(
                    "server.trusted_proxies",
                    format!("{raw:?} is not an IP address or CIDR"),
                ),
            }
        }
        let tls = f.tls.as_ref().map(|t| {
            let cert_file = resolve_path(base, &t.cert_file);
            let key_file = resolve_path(base, &t.key_file);
            if !cert_file.is_file() {
                problems.push(
                    "server.tls.cert_file",
                    format!("{} does not exist", cert_file.display()),
                );
            }
            if !key_file.is_file() {
                problems.push(
                    "server.tls.key_file",
                    format!("{} does not exist", key_file.display()),
                );
            }
            let mut server_config = None;
            let mut warnings = Vec::new();
            if cert_file.is_file() && key_file.is_file() {
                match load_tls(&cert_file, &key_file) {
                    Ok((config, w)) => {
                        server_config = Some(config);
                        warnings = w;
                    }
                    Err((option, problem)) => problems.push(option, problem),
                }
            }
            TlsSettings {
                cert_file,
                key_file,
                server_config,
                warnings,
            }
        });
        let (Some(public), Some(admin_listen)) = (listen, admin_listen) else {
            return (listen, None);
        };
        let settings = ServerSettings {
            listen: public,
            admin_listen,
            threads: f.threads.max(1),
            h2c: f.h2c,
            request_header_timeout: secs(f.request_header_timeout_secs.max(1)),
            keepalive_timeout: secs(f.keepalive_timeout_secs),
            body_timeout: secs(f.body_timeout_secs.max(1)),
            body_idle_timeout: secs(f.body_idle_timeout_secs.max(1)),
            send_timeout: secs(f.send_timeout_secs.max(1)),
            trusted_proxies,
            grace_period: secs(f.grace_period_secs),
            shutdown_timeout: secs(f.shutdown_timeout_secs),
            tls,
        };
        (listen, Some(settings))
    }
}
