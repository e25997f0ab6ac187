//! TLS on both sides of the proxy, with rustls and its `ring` provider (the
//! same rustls the MongoDB driver links): the client configuration for the
//! upstream built from the connection string's `tls*` options, the server
//! configuration for the listener built from `[proxy.tls]`, the stream
//! type that is either plain TCP or TLS over TCP (monoio-rustls, on either
//! I/O driver), and `connect`: dial the upstream (`upstream::dial`) and run
//! the handshake when one is asked for. It owns certificate and key loading and certificate verification
//! policy; it never looks at frames, and it never logs key material (paths
//! and rustls' error names only).
//!
//! Verification is strict unless the connection string asks otherwise, as a
//! driver's is: `tlsAllowInvalidCertificates=true` accepts any certificate,
//! `tlsAllowInvalidHostnames=true` checks the chain but not the name, and
//! `tlsInsecure=true` means both. Without `tlsCAFile` the Mozilla roots
//! (`webpki-roots`) are trusted; with it, only that file's certificates —
//! including, as OpenSSL-based drivers do, a self-signed CA certificate that
//! the server presents as its own (see `anchor_leaf`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};

use super::anchor_leaf::WebPkiOrAnchorLeaf;
use super::upstream::{dial_data, ConnectionString, DialError, HostPort, Resolve};

/// Connection-string options this module reads. Any other `tls*` / `ssl*`
/// option is refused rather than silently ignored: a setting the operator
/// believes is in force must be.
const KNOWN_TLS_OPTIONS: &[&str] = &[
    "tls",
    "ssl",
    "tlsCAFile",
    "tlsCertificateKeyFile",
    "tlsAllowInvalidCertificates",
    "tlsAllowInvalidHostnames",
    "tlsInsecure",
];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the proxy talks TLS to the upstream, from the connection string.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: monoio_rustls::TlsConnector,
    /// Whether `tlsCAFile` chose the trusted certificates (else the
    /// Mozilla roots): the explanation of a refused certificate says so.
    pub trusts_ca_file: bool,
    /// For the startup log line: which relaxations are in force.
    pub allow_invalid_certificates: bool,
    pub allow_invalid_hostnames: bool,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field(
                "allow_invalid_certificates",
                &self.allow_invalid_certificates,
            )
            .field("allow_invalid_hostnames", &self.allow_invalid_hostnames)
            .finish_non_exhaustive()
    }
}

/// The `tls*` options of a connection string, checked but not yet loaded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub enabled: bool,
    pub ca_file: Option<String>,
    pub certificate_key_file: Option<String>,
    pub allow_invalid_certificates: bool,
    pub allow_invalid_hostnames: bool,
}

fn bool_option(cs: &ConnectionString, name: &str) -> Result<Option<bool>, String> {
    match cs.option(name) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(format!("option `{name}`: `{v}` is not true or false")),
    }
}

impl TlsOptions {
    /// Reads and cross-checks the options without touching any file.
    pub fn parse(cs: &ConnectionString) -> Result<TlsOptions, String> {
        for (key, _) in &cs.options {
            let lower = key.to_ascii_lowercase();
            if (lower.starts_with("tls") || lower.starts_with("ssl"))
                && !KNOWN_TLS_OPTIONS
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(key))
            {
                return Err(format!(
                    "option `{key}` is not supported (supported: {})",
                    KNOWN_TLS_OPTIONS.join(", ")
                ));
            }
        }
        let tls = bool_option(cs, "tls")?;
        let ssl = bool_option(cs, "ssl")?;
        if let (Some(a), Some(b)) = (tls, ssl) {
            if a != b {
                return Err("options `tls` and `ssl` contradict each other".to_string());
            }
        }
        let enabled = tls.or(ssl).unwrap_or(false);
        let insecure = bool_option(cs, "tlsInsecure")?;
        let invalid_certs = bool_option(cs, "tlsAllowInvalidCertificates")?;
        let invalid_hosts = bool_option(cs, "tlsAllowInvalidHostnames")?;
        if insecure.is_some() && (invalid_certs.is_some() || invalid_hosts.is_some()) {
            // The URI options spec forbids combining them.
            return Err("option `tlsInsecure` cannot be combined with \
                        `tlsAllowInvalidCertificates` or `tlsAllowInvalidHostnames`"
                .to_string());
        }
        let options = TlsOptions {
            enabled,
            ca_file: cs.option("tlsCAFile").map(str::to_owned),
            certificate_key_file: cs.option("tlsCertificateKeyFile").map(str::to_owned),
            allow_invalid_certificates: insecure.or(invalid_certs).unwrap_or(false),
            allow_invalid_hostnames: insecure.or(invalid_hosts).unwrap_or(false),
        };
        let configured = options.ca_file.is_some()
            || options.certificate_key_file.is_some()
            || insecure.is_some()
            || invalid_certs.is_some()
            || invalid_hosts.is_some();
        if configured && !enabled {
            return Err("TLS options are set but TLS is not enabled: add tls=true".to_string());
        }
        Ok(options)
    }
}

impl UpstreamTls {
    /// `None` when the connection string does not ask for TLS. Reads the
    /// CA and client certificate files; errors name the option and file.
    pub fn from_connection_string(cs: &ConnectionString) -> Result<Option<UpstreamTls>, String> {
        let options = TlsOptions::parse(cs)?;
        if !options.enabled {
            return Ok(None);
        }
        let provider = provider();
        let mut roots = RootCertStore::empty();
        let mut ca_file_certs = Vec::new();
        match &options.ca_file {
            Some(path) => {
                ca_file_certs =
                    load_certs(Path::new(path)).map_err(|e| format!("tlsCAFile: {e}"))?;
                for cert in &ca_file_certs {
                    roots
                        .add(cert.clone())
                        .map_err(|e| format!("tlsCAFile: `{path}`: unusable certificate: {e}"))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = if options.allow_invalid_certificates {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        } else {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tlsCAFile: {e}"))?;
            // webpki's verdict, plus the trusted self-signed CA certificate
            // OpenSSL accepts (`anchor_leaf`), plus the name relaxation when
            // asked. rustls calls every custom verifier "dangerous".
            let verifier =
                WebPkiOrAnchorLeaf::new(webpki, &ca_file_certs, options.allow_invalid_hostnames);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        };
        let config = match &options.certificate_key_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let path = Path::new(path);
                let certs = load_certs(path).map_err(|e| format!("tlsCertificateKeyFile: {e}"))?;
                let key = load_key(path).map_err(|e| format!("tlsCertificateKeyFile: {e}"))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("tlsCertificateKeyFile: {e}"))?
            }
        };
        Ok(Some(UpstreamTls {
            connector: monoio_rustls::TlsConnector::from(Arc::new(config)),
            trusts_ca_file: options.ca_file.is_some(),
            allow_invalid_certificates: options.allow_invalid_certificates,
            allow_invalid_hostnames: options.allow_invalid_hostnames,
        }))
    }

    /// Runs the TLS handshake over a connected socket. SNI and certificate
    /// name checks use `host` as written in the connection string (an IP
    /// address sends no SNI and is checked against the IP SANs).
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<monoio_rustls::ClientTlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{host}` is not a valid TLS server name"),
            )
        })?;
        // Boxed: the handshake future is large and runs once per connection.
        Box::pin(self.connector.connect(name, tcp))
            .await
            .map_err(io::Error::from)
    }
}

/// `tlsAllowInvalidCertificates=true`: any certificate is accepted, but the
/// handshake signatures are still checked (the peer must hold the key of
/// the certificate it sent).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `[proxy.tls]`: the certificate the proxy presents to applications and,
/// optionally, the CA their client certificates must chain to. Files are
/// read when the proxy starts (errors name the key), not by `validate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate (unencrypted).
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates are checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca_file`).
    #[serde(default)]
    pub require_client_cert: bool,
    #[serde(default = "default_tls_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_tls_handshake_timeout() -> Duration {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT
}

impl ListenTlsConfig {
    /// Shape checks only (files are read at startup).
    pub fn validate(&self) -> Result<(), ListenTlsError> {
        for (key, path) in [
            ("proxy.tls.cert_file", &self.cert_file),
            ("proxy.tls.key_file", &self.key_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(listen_error(key, "must name a PEM file"));
            }
        }
        if self.require_client_cert && self.client_ca_file.is_none() {
            return Err(listen_error(
                "proxy.tls.require_client_cert",
                "needs proxy.tls.client_ca_file (the CA client certificates must chain to)",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(listen_error(
                "proxy.tls.handshake_timeout",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// How long a client may take to complete the TLS handshake with the proxy.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the listener's TLS could not be set up: the `[proxy.tls]` key at
/// fault (`proxy.tls.cert_file`...) and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ListenTlsError {
    pub key: &'static str,
    pub problem: String,
}

fn listen_error(key: &'static str, problem: impl Into<String>) -> ListenTlsError {
    ListenTlsError {
        key,
        problem: problem.into(),
    }
}

/// The listener's TLS settings as the accept loop uses them.
#[derive(Clone)]
pub struct ListenTls {
    pub(crate) acceptor: monoio_rustls::TlsAcceptor,
    pub(crate) handshake_timeout: Duration,
    client_cert_required: bool,
}

impl fmt::Debug for ListenTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("client_cert_required", &self.client_cert_required)
            .finish_non_exhaustive()
    }
}

impl ListenTls {
    /// Reads the certificate, key and client CA files of `config` and
    /// builds the acceptor. Errors name the key.
    pub fn load(config: &ListenTlsConfig) -> Result<ListenTls, ListenTlsError> {
        Ok(ListenTls {
            acceptor: listen_acceptor(config)?,
            handshake_timeout: config.handshake_timeout,
            client_cert_required: config.require_client_cert,
        })
    }
}

fn listen_acceptor(config: &ListenTlsConfig) -> Result<monoio_rustls::TlsAcceptor, ListenTlsError> {
    let provider = provider();
    let certs =
        load_certs(&config.cert_file).map_err(|e| listen_error("proxy.tls.cert_file", e))?;
    let key = load_key(&config.key_file).map_err(|e| listen_error("proxy.tls.key_file", e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| listen_error("proxy.tls", e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path).map_err(|e| listen_error("proxy.tls.client_ca_file", e))? {
                roots.add(cert).map_err(|e| {
                    listen_error(
                        "proxy.tls.client_ca_file",
                        format!("`{}`: unusable certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| listen_error("proxy.tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| {
        listen_error(
            "proxy.tls.key_file",
            format!("does not match proxy.tls.cert_file: {e}"),
        )
    })?;
    Ok(monoio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// One log line saying what TLS is in force (and a warning when the
/// connection string relaxes the upstream's certificate checks).
pub(crate) fn log_settings(upstream_tls: Option<&UpstreamTls>, listen_tls: Option<&ListenTls>) {
    if let Some(tls) = upstream_tls {
        if tls.allow_invalid_certificates || tls.allow_invalid_hostnames {
            tracing::warn!(
                allow_invalid_certificates = tls.allow_invalid_certificates,
                allow_invalid_hostnames = tls.allow_invalid_hostnames,
                "upstream TLS certificate checks are relaxed by the connection string"
            );
        }
    }
    tracing::info!(
        upstream_tls = upstream_tls.is_some(),
        client_tls = listen_tls.is_some(),
        client_cert_required = listen_tls.is_some_and(|t| t.client_cert_required),
        "TLS settings"
    );
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no CERTIFICATE block", path.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1); the file may
/// also hold certificates (MongoDB's combined certificate-key files).
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "`{}` holds no unencrypted PRIVATE KEY block (encrypted keys are not supported)",
            path.display()
        ),
        other => format!(
            "cannot read a private key from `{}`: {other}",
            path.display()
        ),
    })
}

/// A socket that is either plain TCP or TLS over TCP (boxed: a TLS stream
/// is over a kilobyte, and most connections are plain).
pub(crate) enum Transport<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client connection, TLS or not.
pub(crate) type ClientStream = Transport<monoio_rustls::ServerTlsStream<TcpStream>>;
/// A connection to the upstream, TLS or not.
pub(crate) type UpstreamStream = Transport<monoio_rustls::ClientTlsStream<TcpStream>>;

impl ListenTls {
    /// The server side of the handshake (in the connection's task, bounded
    /// by `handshake_timeout` by the caller).
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<monoio_rustls::ServerTlsStream<TcpStream>> {
        Box::pin(self.acceptor.accept(tcp))
            .await
            .map_err(io::Error::from)
    }
}

/// Connects to `target` and, with `tls`, runs the TLS handshake, all within
/// `timeout` (a server that accepts TCP but never answers the handshake
/// must not hold a client forever).
pub(crate) async fn connect(
    target: &HostPort,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
    resolver: &dyn Resolve,
) -> Result<UpstreamStream, DialError> {
    let started = std::time::Instant::now();
    let tcp = dial_data(target, timeout, resolver).await?;
    let Some(tls) = tls else {
        return Ok(Transport::Plain(tcp));
    };
    let left = timeout.saturating_sub(started.elapsed());
    match monoio::time::timeout(left, tls.connect(&target.host, tcp)).await {
        Err(_) => Err(DialError::TlsTimeout {
            target: target.clone(),
            timeout,
        }),
        Ok(Err(source)) => Err(DialError::Tls {
            target: target.clone(),
            source,
        }),
        Ok(Ok(stream)) => Ok(Transport::Tls(Box::new(stream))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(uri: &str) -> Result<TlsOptions, String> {
        TlsOptions::parse(&ConnectionString::parse(uri).unwrap())
    }

    #[test]
    fn tls_and_ssl_enable_and_relaxations_need_asking() {
        assert!(!options("mongodb://h").unwrap().enabled);
        assert!(options("mongodb://h/?tls=true").unwrap().enabled);
        assert!(options("mongodb://h/?ssl=TRUE").unwrap().enabled);
        let strict = options("mongodb://h/?tls=true&tlsCAFile=/ca.pem").unwrap();
        assert_eq!(strict.ca_file.as_deref(), Some("/ca.pem"));
        assert!(!strict.allow_invalid_certificates && !strict.allow_invalid_hostnames);
        let insecure = options("mongodb://h/?tls=true&tlsInsecure=true").unwrap();
        assert!(insecure.allow_invalid_certificates && insecure.allow_invalid_hostnames);
        let names = options("mongodb://h/?tls=true&tlsAllowInvalidHostnames=true").unwrap();
        assert!(!names.allow_invalid_certificates && names.allow_invalid_hostnames);
    }

    #[test]
    fn contradictions_and_unknown_options_are_refused() {
        let cases = [
            ("mongodb://h/?tls=true&ssl=false", "contradict"),
            ("mongodb://h/?tls=yes", "not true or false"),
            ("mongodb://h/?tlsCAFile=/ca.pem", "add tls=true"),
            (
                "mongodb://h/?tls=true&tlsInsecure=true&tlsAllowInvalidHostnames=true",
                "cannot be combined",
            ),
            (
                "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=x",
                "tlsCertificateKeyFilePassword` is not supported",
            ),
        ];
        for (uri, expected) in cases {
            let err = options(uri).expect_err(uri);
            assert!(err.contains(expected), "{uri}: {err}");
        }
    }

    #[test]
    fn missing_files_name_the_option_and_path() {
        let cs =
            ConnectionString::parse("mongodb://h/?tls=true&tlsCAFile=/nonexistent/ca.pem").unwrap();
        let err = UpstreamTls::from_connection_string(&cs).unwrap_err();
        assert!(
            err.starts_with("tlsCAFile: cannot read `/nonexistent/ca.pem`"),
            "{err}"
        );
        let cs = ConnectionString::parse("mongodb://h/?tls=true").unwrap();
        assert!(UpstreamTls::from_connection_string(&cs).unwrap().is_some());
    }
}
