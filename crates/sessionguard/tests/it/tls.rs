//! TLS on both sides, with certificates generated at test time: the official
//! Rust driver connects to the proxy with `tls=true&tlsCAFile=...` (the proxy
//! serves TLS), and the proxy connects to the emulator over TLS (the emulator
//! serves TLS, the proxy verifies it against `tlsCAFile` and the host name).
//! Failures must be loud and contained: a wrong CA, an expired certificate
//! or a wrong name answers the client's handshake with an error naming the
//! cause and the fix (the driver's error carries it) and a log line; a
//! missing client certificate is refused. A self-signed certificate that is
//! its own CA, given as `tlsCAFile`, is accepted as the drivers accept it.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use mongodb::Client;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sessionguard::config::{ListenTlsConfig, ProxyConfig};
use sessionguard::metrics::Metrics;
use sessionguard::start_proxy;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_proxy::{NoopInspector, ProxyHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key, as rustls and as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    /// A self-signed certificate that is its own CA (basicConstraints
    /// CA:TRUE) used directly as the server's certificate: what
    /// `openssl req -x509 -newkey ... -subj /CN=host` makes by default, and
    /// what PyMongo and the Node driver accept as their own `tlsCAFile`.
    fn self_signed_ca(names: &[&str], tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, names[0]);
        tweak(&mut params);
        let cert = params.self_signed(&key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The emulator's TLS: `leaf` as its certificate; with `client_ca`, client
/// certificates are required (x.509 to the upstream).
fn emulator_tls(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    Arc::new(
        builder
            .with_single_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Certificates and files for one test.
struct Pki {
    dir: tempfile::TempDir,
    upstream_ca: Ca,
    proxy_ca: Ca,
    client_ca: Ca,
    upstream_leaf: Leaf,
}

impl Pki {
    fn new() -> Pki {
        let upstream_ca = Ca::new("upstream test CA");
        let upstream_leaf = upstream_ca.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        Pki {
            dir: tempfile::tempdir().unwrap(),
            upstream_ca,
            proxy_ca: Ca::new("proxy test CA"),
            client_ca: Ca::new("client test CA"),
            upstream_leaf,
        }
    }

    fn file(&self, name: &str, text: &str) -> String {
        write(self.dir.path(), name, text).display().to_string()
    }

    fn upstream_ca_file(&self) -> String {
        self.file("upstream-ca.pem", &self.upstream_ca.pem())
    }

    fn proxy_ca_file(&self) -> String {
        self.file("proxy-ca.pem", &self.proxy_ca.pem())
    }

    /// `[proxy.tls]` with a certificate from the proxy CA.
    fn listen_tls(&self, client_ca: bool, require: bool) -> ListenTlsConfig {
        let leaf = self.proxy_ca.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        ListenTlsConfig {
            cert_file: self.file("proxy-cert.pem", &leaf.cert_pem).into(),
            key_file: self.file("proxy-key.pem", &leaf.key_pem).into(),
            client_ca_file: client_ca
                .then(|| self.file("client-ca.pem", &self.client_ca.pem()).into()),
            require_client_cert: require,
            handshake_timeout: Duration::from_secs(5),
        }
    }

    /// A combined certificate + key PEM file, as MongoDB tools use.
    fn client_cert_file(&self, name: &str) -> String {
        let leaf = self
            .client_ca
            .issue(&["app-client"], ExtendedKeyUsagePurpose::ClientAuth);
        self.file(name, &format!("{}{}", leaf.cert_pem, leaf.key_pem))
    }
}

async fn emulator(tls: Arc<ServerConfig>) -> EmulatorHandle {
    let config = EmulatorConfig {
        tls: Some(tls),
        ..EmulatorConfig::default()
    };
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// The proxy's upstream URI for a TLS emulator, reached as `host` and
/// trusting the CA in `ca_file`.
fn tls_upstream(emulator: &EmulatorHandle, host: &str, ca_file: &str) -> String {
    format!(
        "mongodb://{host}:{}/?tls=true&tlsCAFile={ca_file}",
        emulator.addr().port()
    )
}

async fn proxy(upstream: String, tls: Option<ListenTlsConfig>) -> ProxyHandle {
    let config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        upstream,
        connect_timeout: Duration::from_secs(3),
        tls,
        ..ProxyConfig::default()
    };
    start_proxy(&config, Arc::new(NoopInspector), &Metrics::new())
        .await
        .expect("proxy starts")
}

async fn client(uri: String) -> Client {
    Client::with_uri_str(uri).await.expect("options parse")
}

/// A proxy in front of `upstream` (plain TCP to clients) and a driver
/// connected directly to it.
async fn proxied(upstream: String, server_selection: Duration) -> (ProxyHandle, Client) {
    let proxy = proxy(upstream, None).await;
    let client = client(format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS={}",
        proxy.local_addr(),
        server_selection.as_millis()
    ))
    .await;
    (proxy, client)
}

async fn crud(client: &Client) -> mongodb::error::Result<Document> {
    let people = client.database("app").collection::<Document>("people");
    people.insert_one(doc! { "_id": 1, "name": "ada" }).await?;
    let found = people.find_one(doc! { "_id": 1 }).await?;
    Ok(found.expect("the document just inserted"))
}

/// A plain TCP connection that sends a hello and reports whether the peer
/// closed the connection without answering it (a TLS server may send an
/// alert first; a wire-protocol reply would carry responseTo 7).
async fn closed_without_reply(addr: SocketAddr) -> bool {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = bson::to_vec(&doc! { "hello": 1, "$db": "admin" }).unwrap();
    let frame = sessionguard_protocol::wire::op_msg::encode(
        7,
        0,
        sessionguard_protocol::wire::MsgFlags(0),
        &body,
    );
    let _ = stream.write_all(&frame).await;
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .is_ok();
    let answered = received.len() >= 16 && received[8..12] == 7i32.to_le_bytes();
    closed && !answered
}

#[tokio::test(flavor = "current_thread")]
async fn the_driver_speaks_tls_to_the_proxy_which_speaks_tls_to_the_upstream() {
    let pki = Pki::new();
    let emulator = emulator(emulator_tls(&pki.upstream_leaf, None)).await;
    // The host name, not the address: SNI and the name check use it.
    let upstream = tls_upstream(&emulator, "localhost", &pki.upstream_ca_file());
    let proxy = proxy(upstream, Some(pki.listen_tls(false, false))).await;
    let client = client(format!(
        "mongodb://localhost:{}/?directConnection=true&tls=true&tlsCAFile={}",
        proxy.local_addr().port(),
        pki.proxy_ca_file()
    ))
    .await;
    let found = crud(&client).await.expect("CRUD over TLS on both legs");
    assert_eq!(found.get_str("name").unwrap(), "ada");
    assert!(emulator.command_count("insert") >= 1);
    assert!(emulator.command_count("find") >= 1);

    // The proxy does not accept plain TCP when it serves TLS.
    assert!(closed_without_reply(proxy.local_addr()).await);
    // ...and the emulator only speaks TLS, so the proxy's leg was TLS too.
    assert!(closed_without_reply(emulator.addr()).await);
    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_upstream_certificate_from_another_ca_is_explained_to_the_client_and_logged() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let pki = Pki::new();
    let emulator = emulator(emulator_tls(&pki.upstream_leaf, None)).await;
    // Trusts the proxy CA, which did not sign the emulator's certificate.
    let upstream = tls_upstream(&emulator, "localhost", &pki.proxy_ca_file());
    let proxy = proxy(upstream, None).await;

    // The handshake is answered with the cause, then the connection closed.
    let outcome = common::handshake_once(proxy.local_addr(), false).await;
    let (_, response_to, reply) = outcome.reply.expect("an error reply, not a reset");
    assert_eq!(response_to, 7);
    assert_eq!(reply.get_f64("ok").ok(), Some(0.0), "{reply}");
    let errmsg = reply.get_str("errmsg").unwrap();
    assert!(
        errmsg.contains(&format!(
            "sessionguard could not reach upstream localhost:{}: TLS handshake failed",
            emulator.addr().port()
        )) && errmsg.contains("UnknownIssuer")
            && errmsg.contains("tlsCAFile"),
        "{errmsg}"
    );
    assert!(
        outcome.closed,
        "the connection must be closed after the reply"
    );

    let client = client(format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=1500",
        proxy.local_addr()
    ))
    .await;
    let err = crud(&client).await.expect_err("no upstream, no commands");
    assert!(
        err.to_string().contains("UnknownIssuer"),
        "the driver's error must carry the cause: {err}"
    );
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("TLS handshake with upstream localhost:"))
        .unwrap_or_else(|| panic!("no TLS failure line in:\n{text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert_eq!(emulator.command_count("find"), 0);
    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_self_signed_certificate_that_is_its_own_ca_is_accepted_as_tls_ca_file() {
    let pki = Pki::new();
    let own_ca = Leaf::self_signed_ca(&["localhost", "127.0.0.1"], |_| {});
    let emulator = emulator(emulator_tls(&own_ca, None)).await;
    let ca_file = pki.file("self-signed.pem", &own_ca.cert_pem);
    // By name (SNI and a DNS SAN) and by address (an IP SAN).
    for host in ["localhost", "127.0.0.1"] {
        let upstream = format!(
            "mongodb://{host}:{}/?tls=true&tlsCAFile={ca_file}",
            emulator.addr().port()
        );
        let (proxy, client) = proxied(upstream, Duration::from_secs(5)).await;
        let found = if host == "localhost" {
            crud(&client).await.map(Some)
        } else {
            let people = client.database("app").collection::<Document>("people");
            people.find_one(doc! { "_id": 1 }).await
        };
        let found = found
            .unwrap_or_else(|e| panic!("{host}: the self-signed CA certificate is trusted: {e}"))
            .expect("the document inserted through the first proxy");
        assert_eq!(found.get_str("name").unwrap(), "ada");
        client.shutdown().await;
        proxy.shutdown_now();
        proxy.wait().await;
    }
    emulator.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn upstream_certificate_failures_reach_the_driver_with_the_cause_and_the_fix() {
    let pki = Pki::new();
    let own_ca = Leaf::self_signed_ca(&["localhost"], |_| {});
    let expired = Leaf::self_signed_ca(&["localhost"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let other_name = Leaf::self_signed_ca(&["db.internal.example"], |_| {});
    let stranger = Leaf::self_signed_ca(&["localhost"], |_| {});
    let cases: [(&str, &Leaf, String, &[&str]); 4] = [
        (
            "a CA certificate as the leaf, another one in tlsCAFile",
            &own_ca,
            pki.file("stranger.pem", &stranger.cert_pem),
            &["CaUsedAsEndEntity", "tlsCAFile"],
        ),
        (
            "an expired self-signed certificate",
            &expired,
            pki.file("expired.pem", &expired.cert_pem),
            &["expired", "renew"],
        ),
        (
            "a certificate for another name",
            &other_name,
            pki.file("other-name.pem", &other_name.cert_pem),
            &["not valid for `localhost`", "db.internal.example"],
        ),
        (
            "a leaf from a CA not in tlsCAFile",
            &pki.upstream_leaf,
            pki.proxy_ca_file(),
            &["UnknownIssuer", "tlsCAFile"],
        ),
    ];
    for (case, leaf, ca_file, expected) in cases {
        let emulator = emulator(emulator_tls(leaf, None)).await;
        let upstream = format!(
            "mongodb://localhost:{}/?tls=true&tlsCAFile={ca_file}",
            emulator.addr().port()
        );
        let (proxy, client) = proxied(upstream, Duration::from_millis(1500)).await;
        let err = client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
            .expect_err(case)
            .to_string();
        let prefix = format!(
            "sessionguard could not reach upstream localhost:{}: TLS handshake failed",
            emulator.addr().port()
        );
        assert!(err.contains(&prefix), "{case}: {err}");
        for needle in expected {
            assert!(
                err.contains(needle),
                "{case}: `{needle}` missing from {err}"
            );
        }
        assert_eq!(emulator.command_count("ping"), 0, "{case}");
        client.shutdown().await;
        proxy.shutdown_now();
        proxy.wait().await;
        emulator.shutdown().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn relaxed_checks_apply_only_when_the_connection_string_asks() {
    let pki = Pki::new();
    // A certificate for another name, from a CA the proxy is told about.
    let other = pki.upstream_ca.issue(
        &["db.internal.example"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let emulator = emulator(emulator_tls(&other, None)).await;
    let base = format!(
        "mongodb://localhost:{}/?tls=true&serverSelectionTimeoutMS=1500",
        emulator.addr().port()
    );
    let ca = pki.upstream_ca_file();
    let cases = [
        (format!("{base}&tlsCAFile={ca}"), false),
        (
            format!("{base}&tlsCAFile={ca}&tlsAllowInvalidHostnames=true"),
            true,
        ),
        // Unknown CA and wrong name: only tlsInsecure / AllowInvalidCertificates pass.
        (format!("{base}&tlsAllowInvalidHostnames=true"), false),
        (format!("{base}&tlsAllowInvalidCertificates=true"), true),
        (format!("{base}&tlsInsecure=true"), true),
    ];
    for (upstream, works) in cases {
        let proxy = proxy(upstream.clone(), None).await;
        let client = client(format!(
            "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=1500",
            proxy.local_addr()
        ))
        .await;
        let ping = client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await;
        assert_eq!(ping.is_ok(), works, "{upstream}: {ping:?}");
        client.shutdown().await;
        proxy.shutdown_now();
        proxy.wait().await;
    }
    emulator.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_required_client_certificate_is_checked_and_a_missing_one_refused() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let pki = Pki::new();
    let emulator = emulator(emulator_tls(&pki.upstream_leaf, None)).await;
    let upstream = tls_upstream(&emulator, "127.0.0.1", &pki.upstream_ca_file());
    let proxy = proxy(upstream, Some(pki.listen_tls(true, true))).await;
    let base = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true&tls=true&tlsCAFile={}&serverSelectionTimeoutMS=1500",
        proxy.local_addr().port(),
        pki.proxy_ca_file()
    );

    let without = client(base.clone()).await;
    let err = crud(&without).await.expect_err("no client certificate");
    assert!(
        matches!(*err.kind, mongodb::error::ErrorKind::ServerSelection { .. }),
        "{err}"
    );
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("client TLS handshake failed") && l.contains("WARN")),
        "{text}"
    );
    assert_eq!(emulator.command_count("insert"), 0);
    without.shutdown().await;

    // A certificate from another CA is refused too.
    let stranger = Ca::new("stranger CA").issue(&["intruder"], ExtendedKeyUsagePurpose::ClientAuth);
    let stranger_file = pki.file(
        "stranger.pem",
        &format!("{}{}", stranger.cert_pem, stranger.key_pem),
    );
    let intruder = client(format!("{base}&tlsCertificateKeyFile={stranger_file}")).await;
    assert!(crud(&intruder).await.is_err());
    intruder.shutdown().await;

    let with = client(format!(
        "{base}&tlsCertificateKeyFile={}",
        pki.client_cert_file("client.pem")
    ))
    .await;
    let found = crud(&with).await.expect("client certificate accepted");
    assert_eq!(found.get_i32("_id").unwrap(), 1);
    with.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    emulator.shutdown().await;
}

/// A client that connects to the TLS listener and never sends its
/// ClientHello holds nothing past `handshake_timeout`: the proxy closes it
/// and says why.
#[tokio::test(flavor = "current_thread")]
async fn a_client_that_never_starts_its_tls_handshake_is_closed_after_the_timeout() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let pki = Pki::new();
    let emulator = emulator(emulator_tls(&pki.upstream_leaf, None)).await;
    let upstream = tls_upstream(&emulator, "127.0.0.1", &pki.upstream_ca_file());
    let listen = ListenTlsConfig {
        handshake_timeout: Duration::from_millis(300),
        ..pki.listen_tls(false, false)
    };
    let proxy = proxy(upstream, Some(listen)).await;

    let mut silent = tokio::net::TcpStream::connect(proxy.local_addr())
        .await
        .unwrap();
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut received))
        .await
        .is_ok();
    assert!(
        closed,
        "a silent client still held its connection after 20 s"
    );
    assert!(
        received.is_empty(),
        "nothing is sent to a client that never spoke"
    );
    // The handshake (and the socket it holds) is dropped as the timeout
    // ends it, before the line is written: wait for the line.
    let said_why = common::Stack::eventually(Duration::from_secs(10), || {
        logs.text().lines().any(|l| {
            l.contains("client TLS handshake not completed within 300ms") && l.contains("WARN")
        })
    })
    .await;
    assert!(said_why, "{}", logs.text());
    proxy.shutdown_now();
    proxy.wait().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_proxy_presents_its_client_certificate_to_an_upstream_that_requires_one() {
    let pki = Pki::new();
    let emulator = emulator(emulator_tls(&pki.upstream_leaf, Some(&pki.client_ca))).await;
    let base = format!(
        "mongodb://localhost:{}/?tls=true&tlsCAFile={}",
        emulator.addr().port(),
        pki.upstream_ca_file()
    );

    let without = proxy(base.clone(), None).await;
    assert!(closed_without_reply(without.local_addr()).await);
    without.shutdown_now();
    without.wait().await;

    let upstream = format!(
        "{base}&tlsCertificateKeyFile={}",
        pki.client_cert_file("proxy-client.pem")
    );
    let proxy = proxy(upstream, None).await;
    let client = client(format!(
        "mongodb://{}/?directConnection=true",
        proxy.local_addr()
    ))
    .await;
    crud(&client)
        .await
        .expect("x.509 client certificate accepted");
    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    emulator.shutdown().await;
}

#[tokio::test]
async fn bad_tls_files_fail_the_start_naming_the_key() {
    let pki = Pki::new();
    let mut listen = pki.listen_tls(false, false);
    listen.cert_file = pki.dir.path().join("missing.pem");
    let config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        tls: Some(listen),
        ..ProxyConfig::default()
    };
    let err = start_proxy(&config, Arc::new(NoopInspector), &Metrics::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("proxy.tls.cert_file: cannot read"), "{err}");

    // A key that does not belong to the certificate.
    let mut listen = pki.listen_tls(false, false);
    let other = pki
        .proxy_ca
        .issue(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    listen.key_file = pki.file("other-key.pem", &other.key_pem).into();
    let config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        tls: Some(listen),
        ..ProxyConfig::default()
    };
    let err = start_proxy(&config, Arc::new(NoopInspector), &Metrics::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("proxy.tls.key_file: does not match"),
        "{err}"
    );

    let config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        upstream: "mongodb://h/?tls=true&tlsCAFile=/nonexistent/ca.pem".to_string(),
        ..ProxyConfig::default()
    };
    let err = start_proxy(&config, Arc::new(NoopInspector), &Metrics::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("proxy.upstream: tlsCAFile: cannot read `/nonexistent/ca.pem`"),
        "{err}"
    );
}

#[test]
fn the_example_config_documents_proxy_tls_with_its_defaults() {
    let example = include_str!("../../../../config/sessionguard.toml");
    let block: String = example
        .lines()
        .skip_while(|l| l.trim() != "#     [proxy.tls]")
        .take_while(|l| l.starts_with("#     "))
        .map(|l| format!("{}\n", &l["#     ".len()..]))
        .collect();
    assert!(block.starts_with("[proxy.tls]"), "{block}");
    let config = sessionguard::config::Config::parse(&block).unwrap();
    config.validate().unwrap();
    let tls = config.proxy.tls.expect("[proxy.tls] parsed");
    assert!(!tls.require_client_cert);
    assert!(tls.client_ca_file.is_some());
    assert_eq!(
        tls.handshake_timeout,
        sessionguard::config::DEFAULT_TLS_HANDSHAKE_TIMEOUT
    );
}

#[test]
fn the_binary_reports_a_bad_tls_file_as_a_config_error_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "sessionguard.toml",
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[proxy.tls]\ncert_file = \"/nonexistent/proxy.pem\"\nkey_file = \"/nonexistent/proxy-key.pem\"\n",
    );
    for args in [
        vec!["check-config".to_string(), config.display().to_string()],
        vec![
            "proxy".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ],
    ] {
        let out = common::sessionguard_command().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains("proxy.tls.cert_file"),
            "{args:?} must name the key: {stderr}"
        );
    }
}
