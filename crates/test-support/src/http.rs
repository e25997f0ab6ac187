//! The admin API from a test: a plain HTTP/1.1 client (no client crate)
//! and an admin server for a test's proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::stack::GuardedProxy;

/// One admin HTTP response.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// A plain HTTP/1.1 GET (an admin API needs no client crate).
pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpReply {
    http_request(addr, "GET", path, token).await
}

/// A plain HTTP/1.1 request without a body (`POST /reload`, or a method a
/// route refuses).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin accepts");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}{length}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("admin answers in time")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Serves the admin API for `proxy` (its metrics), probing `upstream`
/// every 100 ms so `/readyz` follows the upstream quickly.
pub async fn admin_for(
    proxy: &GuardedProxy,
    engine: Option<Arc<sessionguard_engine::SessionEngine>>,
    upstream: SocketAddr,
    token: Option<&str>,
) -> (
    sessionguard::admin::AdminServer,
    tokio_util::sync::CancellationToken,
) {
    let context = sessionguard::admin::AdminContext {
        metrics: proxy.metrics().clone(),
        engine,
        token: token.map(sessionguard::config::AdminToken::new),
        probe: Some(sessionguard::admin::UpstreamProbe {
            targets: vec![sessionguard_proxy::HostPort {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            }],
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        }),
        reload: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let admin = sessionguard::admin::serve_with("127.0.0.1:0", context, shutdown.clone())
        .await
        .expect("admin starts");
    (admin, shutdown)
}
