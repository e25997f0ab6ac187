//! What a client is told when its upstream cannot be dialed (refused, name
//! not resolved, timed out, TLS handshake failed): instead of a bare reset,
//! the proxy reads the client's first frame — a driver's handshake, `hello`
//! as OP_MSG or legacy `isMaster` as OP_QUERY on `admin.$cmd` — within
//! `connect_timeout` (or `frame_read_timeout`, if shorter: a client that
//! says nothing gets no longer than the upstream got to answer) and
//! `max_message_size`, answers it in the same
//! opcode with a MongoDB-shaped error whose `errmsg` names the upstream, the
//! cause and the fix, and closes the connection. Drivers put that text in
//! the error the application sees (the failed handshake marks the server
//! Unknown, so it shows in the server-selection error).
//!
//! The reply is `{ ok: 0, errmsg, code: 6, codeName: "HostUnreachable",
//! errorLabels: ["RetryableWriteError"] }`: the request never reached a
//! server, so it must stay as retryable as the network error it replaces —
//! HostUnreachable is on every driver's retryable-read list and on no
//! "not writable primary" / "node is recovering" list, and the label makes
//! drivers retry a write that failed on this handshake (the Rust driver
//! labels only network errors itself). No `TransientTransactionError`: on a
//! retried commit it would make `withTransaction` run the whole transaction
//! again. This module owns the texts, the reply and the first-frame
//! exchange; it never logs or echoes what the client sent.

use std::io;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::anchor_leaf::is_ca_used_as_end_entity;
use super::tls::UpstreamTls;
use super::upstream::{DialError, HostPort};
use crate::metrics::ConnectFailure;
use sessionguard_protocol::wire::{self, FrameCodec, Message, MsgFlags};

/// The reply's `code`: HostUnreachable.
pub(crate) const UPSTREAM_UNREACHABLE_CODE: i32 = 6;
/// The reply's `codeName`.
pub(crate) const UPSTREAM_UNREACHABLE_CODE_NAME: &str = "HostUnreachable";
/// The reply's `errorLabels`.
pub(crate) const UPSTREAM_UNREACHABLE_LABELS: &[&str] = &["RetryableWriteError"];

/// The request id of the reply (the connection has no other traffic).
const REPLY_ID: i32 = 1;

/// After the reply, how long the client may take to close its side before
/// the proxy closes anyway. Drivers close at once on a failed handshake;
/// closing first with unread bytes would turn the close into a reset that
/// can destroy the reply before the client reads it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The `reason` label of a failed dial.
pub(crate) fn failure_reason(error: &DialError) -> ConnectFailure {
    match error {
        DialError::Timeout { .. } => ConnectFailure::Timeout,
        DialError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
            ConnectFailure::Refused
        }
        DialError::Resolve { .. } => ConnectFailure::Dns,
        DialError::Tls { .. } | DialError::TlsTimeout { .. } => ConnectFailure::Tls,
        DialError::Io { .. } => ConnectFailure::Other,
    }
}

/// The `errmsg`: "sessionguard could not reach upstream HOST:PORT: CAUSE.
/// Fix: FIX".
pub(crate) fn explain(error: &DialError, tls: Option<&UpstreamTls>) -> String {
    let target = error.target();
    let (cause, fix) = match error {
        DialError::Resolve { source, .. } => (
            format!(
                "the host name `{}` does not resolve ({source})",
                target.host
            ),
            "check the host name in proxy.upstream (--upstream) and the DNS the proxy's host \
             uses"
                .to_string(),
        ),
        DialError::Timeout { timeout, .. } => (
            format!("no connection within {timeout:?} (proxy.connect_timeout)"),
            "check the address and port in proxy.upstream, that mongod is running, and that \
             no firewall or security group drops the proxy's packets to it"
                .to_string(),
        ),
        DialError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => (
            "connection refused".to_string(),
            format!(
                "is the address in proxy.upstream right, and is mongod running and listening \
                 on port {} (net.port, net.bindIp)?",
                target.port
            ),
        ),
        DialError::Io { source, .. } => (
            source.to_string(),
            "check the address in proxy.upstream and the network route from the proxy's host \
             to it"
                .to_string(),
        ),
        DialError::TlsTimeout { timeout, .. } => (
            format!("TLS handshake failed: no answer within {timeout:?} (proxy.connect_timeout)"),
            NOT_TLS_FIX.to_string(),
        ),
        DialError::Tls { source, .. } => {
            let (cause, fix) = tls_cause(source, target, tls.is_some_and(|t| t.trusts_ca_file));
            (format!("TLS handshake failed: {cause}"), fix)
        }
    };
    format!("sessionguard could not reach upstream {target}: {cause}. Fix: {fix}")
}

const NOT_TLS_FIX: &str = "does the upstream serve TLS on this port (net.tls.mode)? If it does \
                           not, remove tls=true from proxy.upstream";

/// Cause and fix of a failed TLS handshake, from rustls' error.
fn tls_cause(source: &io::Error, target: &HostPort, trusts_ca_file: bool) -> (String, String) {
    use rustls::CertificateError as Cert;

    let Some(error) = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match source.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => (
                format!("the upstream closed the connection during the handshake ({source})"),
                format!(
                    "{NOT_TLS_FIX}; if it requires client certificates, set \
                     tlsCertificateKeyFile in proxy.upstream"
                ),
            ),
            io::ErrorKind::InvalidInput => (
                source.to_string(),
                "write the upstream as a DNS name or an IP address in proxy.upstream".to_string(),
            ),
            _ => (source.to_string(), GENERIC_TLS_FIX.to_string()),
        };
    };
    let untrusted_fix = if trusts_ca_file {
        "tlsCAFile in proxy.upstream must hold the CA that issued the upstream's certificate \
         (or, for a self-signed certificate, that certificate itself): the file your drivers \
         use as tlsCAFile"
    } else {
        "proxy.upstream has no tlsCAFile, so only public CAs are trusted: add \
         tlsCAFile=<the CA file your drivers use> to it"
    };
    match error {
        _ if is_ca_used_as_end_entity(error) => (
            "the server certificate is a CA certificate used as an end-entity certificate, \
             and not the one in tlsCAFile (CaUsedAsEndEntity)"
                .to_string(),
            "put exactly the upstream's certificate in tlsCAFile in proxy.upstream (a \
             self-signed certificate given as tlsCAFile is trusted as itself), or give the \
             upstream a server certificate issued by the CA in tlsCAFile"
                .to_string(),
        ),
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => (
            "the server certificate is not issued by a trusted CA (UnknownIssuer)".to_string(),
            untrusted_fix.to_string(),
        ),
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => {
            let presented = match error {
                rustls::Error::InvalidCertificate(Cert::NotValidForNameContext {
                    presented,
                    ..
                }) if !presented.is_empty() => presented
                    .iter()
                    .map(|name| presented_name(name))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "other names".to_string(),
            };
            (
                format!(
                    "the server certificate is not valid for `{}`: its subjectAltName lists {} \
                     (NotValidForName)",
                    target.host, presented
                ),
                format!(
                    "write the upstream in proxy.upstream with a name the certificate lists, \
                     or reissue the certificate with `{}` in its subjectAltName \
                     (tlsAllowInvalidHostnames=true turns the check off)",
                    target.host
                ),
            )
        }
        rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            let when = match error {
                rustls::Error::InvalidCertificate(Cert::ExpiredContext { not_after, .. }) => {
                    format!(" on {}", utc(not_after.as_secs()))
                }
                _ => String::new(),
            };
            (
                format!("the server certificate expired{when} (Expired)"),
                "renew the upstream's certificate (and check the clock of the proxy's host)"
                    .to_string(),
            )
        }
        rustls::Error::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            let when = match error {
                rustls::Error::InvalidCertificate(Cert::NotValidYetContext {
                    not_before, ..
                }) => format!(" before {}", utc(not_before.as_secs())),
                _ => String::new(),
            };
            (
                format!("the server certificate is not valid{when} (NotValidYet)"),
                "check the clocks of the proxy's host and of the machine that issued the \
                 certificate"
                    .to_string(),
            )
        }
        rustls::Error::InvalidCertificate(
            Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. },
        ) => (
            "the server certificate is not for TLS servers: its extendedKeyUsage lacks \
             serverAuth or its keyUsage lacks digitalSignature/keyEncipherment (InvalidPurpose)"
                .to_string(),
            "reissue the upstream's certificate for server use (extendedKeyUsage serverAuth)"
                .to_string(),
        ),
        rustls::Error::InvalidCertificate(Cert::BadSignature) => (
            "the server certificate's signature does not verify with the trusted CA \
             (BadSignature)"
                .to_string(),
            untrusted_fix.to_string(),
        ),
        rustls::Error::InvalidCertificate(other) => (
            format!("the server certificate was refused ({other:?})"),
            untrusted_fix.to_string(),
        ),
        rustls::Error::AlertReceived(alert) => (
            format!("the upstream refused the handshake (alert {alert:?})"),
            "if the upstream requires client certificates, set tlsCertificateKeyFile in \
             proxy.upstream; otherwise allow TLS 1.2 or 1.3 on the upstream"
                .to_string(),
        ),
        rustls::Error::InvalidMessage(_) => (
            format!("the upstream did not answer in TLS ({error})"),
            NOT_TLS_FIX.to_string(),
        ),
        rustls::Error::PeerIncompatible(_) => (
            format!("no TLS version or cipher suite in common ({error})"),
            "the proxy speaks TLS 1.2 and 1.3; allow one of them on the upstream \
             (net.tls.disabledProtocols)"
                .to_string(),
        ),
        other => (other.to_string(), GENERIC_TLS_FIX.to_string()),
    }
}

const GENERIC_TLS_FIX: &str =
    "compare the upstream's TLS settings with the tls options of proxy.upstream";

/// `DnsName("db1")` / `IpAddress(10.0.0.1)` as webpki reports them -> the name.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|rest| rest.strip_suffix(')'))
        })
        .unwrap_or(name)
}

fn utc(seconds: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The error reply's body for `errmsg`.
pub(crate) fn reply_body(errmsg: &str) -> Vec<u8> {
    let body = bson::doc! {
        "ok": 0.0,
        "errmsg": errmsg,
        "code": UPSTREAM_UNREACHABLE_CODE,
        "codeName": UPSTREAM_UNREACHABLE_CODE_NAME,
        "errorLabels": UPSTREAM_UNREACHABLE_LABELS,
    };
    bson::to_vec(&body).expect("a document of strings and numbers encodes")
}

/// How the client's first frame was dealt with (for the close log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// Answered with an OP_MSG error reply.
    OpMsg,
    /// A legacy OP_QUERY, answered with an OP_REPLY.
    OpReply,
    /// Nothing could be answered: why.
    Not(&'static str),
}

impl Answered {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Answered::OpMsg => "OP_MSG error reply",
            Answered::OpReply => "OP_REPLY error reply",
            Answered::Not(why) => why,
        }
    }
}

/// Reads the client's first frame (within `wait`, at most
/// `max_message_size`), answers it with the error reply carrying `errmsg`,
/// and lets the client close first (bounded). The caller then drops the
/// connection.
pub(crate) async fn answer_first_frame<S>(
    client: &mut S,
    errmsg: &str,
    max_message_size: usize,
    wait: Duration,
) -> Answered
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let read_first = async {
        let mut buf = BytesMut::with_capacity(4096);
        let mut codec = FrameCodec::new(max_message_size);
        loop {
            match codec.decode(&mut buf) {
                Err(_) => return Err("the client's first frame was unreadable"),
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
            }
            if buf.capacity() == buf.len() {
                buf.reserve(4096);
            }
            // Into the spare capacity (a whole-buffer read writes from 0).
            let (len, cap) = (buf.len(), buf.capacity());
            let (res, back) = client.read(SliceMut::new(buf, len, cap)).await;
            buf = back.into_inner();
            match res {
                Ok(0) => return Err("the client closed without a request"),
                Err(_) => return Err("the client's first frame was unreadable"),
                Ok(_) => {}
            }
        }
    };
    // Boxed: once per failed dial, and it would otherwise sit inline in
    // every connection's future.
    let frame = match monoio::time::timeout(wait, Box::pin(read_first)).await {
        Err(_) => return Answered::Not("no request in time"),
        Ok(Err(why)) => return Answered::Not(why),
        Ok(Ok(frame)) => frame,
    };
    // Anything after the first frame (a pipelined request) is dropped.
    let Ok(opened) = wire::open(&frame, max_message_size) else {
        return Answered::Not("the client's first frame was malformed");
    };
    let body = reply_body(errmsg);
    let request_id = frame.header.request_id;
    let (bytes, answered) = match opened.parse(&frame) {
        Ok(Message::Msg(msg)) if msg.flags.more_to_come() => {
            return Answered::Not("the first request expects no reply (moreToCome)")
        }
        Ok(Message::Msg(_)) => (
            wire::op_msg::encode(REPLY_ID, request_id, MsgFlags::default(), &body),
            Answered::OpMsg,
        ),
        Ok(Message::Query(_)) => (
            wire::legacy::encode_reply(REPLY_ID, request_id, 0, 0, &[&body]),
            Answered::OpReply,
        ),
        Ok(_) => return Answered::Not("the first frame was not a request"),
        Err(_) => return Answered::Not("the client's first frame was malformed"),
    };
    let (written, _) = client.write_all(bytes).await;
    if written.is_err() || client.flush().await.is_err() {
        return Answered::Not("the client left before the reply");
    }
    let _ = client.shutdown().await;
    // Wait for the client's close (bounded), discarding anything it sends.
    let drain = async {
        let mut scratch = vec![0u8; 1024];
        loop {
            let (res, back) = client.read(scratch).await;
            scratch = back;
            scratch.clear();
            if !matches!(res, Ok(n) if n > 0) {
                break;
            }
        }
    };
    let _ = monoio::time::timeout(CLOSE_GRACE, Box::pin(drain)).await;
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> HostPort {
        HostPort {
            host: "db1".to_string(),
            port: 27017,
        }
    }

    fn tls_error(error: rustls::Error) -> DialError {
        DialError::Tls {
            target: target(),
            source: io::Error::new(io::ErrorKind::InvalidData, error),
        }
    }

    #[test]
    fn every_cause_names_the_upstream_and_a_fix() {
        use rustls::CertificateError as Cert;
        let io_error = |kind, text: &str| io::Error::new(kind, text.to_string());
        let cases: Vec<(DialError, &[&str])> = vec![
            (
                DialError::Io {
                    target: target(),
                    source: io_error(io::ErrorKind::ConnectionRefused, "refused"),
                },
                &["connection refused", "is mongod running", "27017"],
            ),
            (
                DialError::Resolve {
                    target: target(),
                    source: io_error(io::ErrorKind::Other, "Name or service not known"),
                },
                &["`db1` does not resolve", "DNS"],
            ),
            (
                DialError::Timeout {
                    target: target(),
                    timeout: Duration::from_secs(5),
                },
                &[
                    "no connection within 5s",
                    "proxy.connect_timeout",
                    "firewall",
                ],
            ),
            (
                DialError::TlsTimeout {
                    target: target(),
                    timeout: Duration::from_secs(5),
                },
                &["TLS handshake failed", "remove tls=true"],
            ),
            (
                tls_error(Cert::UnknownIssuer.into()),
                &["UnknownIssuer", "tlsCAFile"],
            ),
            (tls_error(Cert::Expired.into()), &["expired", "renew"]),
            (
                tls_error(Cert::NotValidForName.into()),
                &["not valid for `db1`", "subjectAltName"],
            ),
            (
                tls_error(Cert::InvalidPurpose.into()),
                &["serverAuth", "InvalidPurpose"],
            ),
            (
                tls_error(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateRequired,
                )),
                &["CertificateRequired", "tlsCertificateKeyFile"],
            ),
            (
                DialError::Tls {
                    target: target(),
                    source: io_error(io::ErrorKind::UnexpectedEof, "tls handshake eof"),
                },
                &[
                    "closed the connection during the handshake",
                    "remove tls=true",
                ],
            ),
        ];
        for (error, expected) in cases {
            let text = explain(&error, None);
            assert!(
                text.starts_with("sessionguard could not reach upstream db1:27017: "),
                "{text}"
            );
            assert!(text.contains(". Fix: "), "{text}");
            for needle in expected {
                assert!(text.contains(needle), "`{needle}` missing: {text}");
            }
            // Drivers match these phrases in error messages without a code.
            for phrase in ["not master", "node is recovering", "not primary"] {
                assert!(!text.to_lowercase().contains(phrase), "{text}");
            }
        }
    }

    #[test]
    fn the_code_is_retryable_but_no_topology_change() {
        // HostUnreachable: on the retryable-read lists of the specs, the Rust
        // driver, PyMongo and the Node.js driver; on none of the "not
        // writable primary" / "node is recovering" / shutdown lists.
        const STATE_CHANGE_CODES: [i32; 8] = [10107, 13435, 10058, 11600, 11602, 13436, 189, 91];
        assert!(!STATE_CHANGE_CODES.contains(&UPSTREAM_UNREACHABLE_CODE));
        let body = bson::Document::from_reader(reply_body("x").as_slice()).unwrap();
        assert_eq!(body.get_f64("ok").unwrap(), 0.0);
        assert_eq!(body.get_i32("code").unwrap(), 6);
        assert_eq!(body.get_str("codeName").unwrap(), "HostUnreachable");
        let labels = body.get_array("errorLabels").unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].as_str(), Some("RetryableWriteError"));
    }

    #[test]
    fn presented_names_lose_webpki_decoration() {
        assert_eq!(presented_name("DnsName(\"db1.example\")"), "db1.example");
        assert_eq!(presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }

    /// On both drivers: a real socket pair, the client a blocking std
    /// socket on its own thread.
    #[test]
    fn the_first_frame_is_answered_in_its_own_opcode_and_more_to_come_is_not() {
        for driver in [crate::Driver::IoUring, crate::Driver::Epoll] {
            answers_on(driver);
        }
    }

    fn answers_on(driver: crate::Driver) {
        use std::io::{Read, Write};
        let hello = bson::to_vec(&bson::doc! { "hello": 1, "$db": "admin" }).unwrap();
        let cases = [
            (
                wire::op_msg::encode(9, 0, MsgFlags::default(), &hello),
                Answered::OpMsg,
            ),
            (
                wire::legacy::encode_query(9, 0, "admin.$cmd", 0, -1, &hello),
                Answered::OpReply,
            ),
            (
                wire::op_msg::encode(9, 0, MsgFlags(MsgFlags::MORE_TO_COME), &hello),
                Answered::Not("the first request expects no reply (moreToCome)"),
            ),
        ];
        for (request, expected) in cases {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let client = std::thread::spawn(move || {
                let mut client = std::net::TcpStream::connect(addr).unwrap();
                client.write_all(&request).unwrap();
                let mut received = Vec::new();
                client.read_to_end(&mut received).unwrap();
                received
            });
            let (accepted, _) = listener.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            let mut rt = crate::driver::build_runtime(driver).unwrap();
            let answered = rt.block_on(async move {
                let mut proxy_side = monoio::net::TcpStream::from_std(accepted).unwrap();
                let answered =
                    answer_first_frame(&mut proxy_side, "why", 1 << 20, Duration::from_secs(5))
                        .await;
                // Unanswered, the caller drops the socket; io_uring closes
                // it on the next loop turn, which a test's `block_on` does
                // not run: end the client's read explicitly.
                let _ = proxy_side.shutdown().await;
                answered
            });
            let received = client.join().unwrap();
            assert_eq!(answered, expected, "{driver}");
            if let Answered::Not(_) = expected {
                assert!(received.is_empty());
                continue;
            }
            let header = wire::MsgHeader::parse(&received[..wire::HEADER_LEN]).unwrap();
            assert_eq!(header.response_to, 9);
            let frame = wire::Frame {
                header,
                bytes: received.into(),
            };
            let opened = wire::open(&frame, 1 << 20).unwrap();
            let doc = match opened.parse(&frame).unwrap() {
                Message::Msg(msg) => bson::Document::try_from(msg.body).unwrap(),
                Message::Reply(reply) => bson::Document::try_from(reply.first().unwrap()).unwrap(),
                other => panic!("{other:?}"),
            };
            assert_eq!(doc.get_str("errmsg").unwrap(), "why");
        }
    }
}
