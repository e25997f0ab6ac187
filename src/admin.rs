//! The admin HTTP server (hyper 1, HTTP/1.1). It owns the routes below and
//! nothing else; it must never expose document contents.
//!
//! Routes:
//! - `GET /healthz` -> `200 ok`: the process is up and serving.
//! - anything else -> `404`.
//!
//! (`/metrics`, `/readyz`, `/sessions` and `/violations` come with the
//! metrics and session engine.)

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    pub local_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Binds `addr` and serves the admin routes until `shutdown` is cancelled.
pub async fn serve(addr: &str, shutdown: CancellationToken) -> io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    info!(admin = %local_addr, "admin server listening");
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        // Resource exhaustion: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let conn =
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(route));
                tokio::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            debug!(%peer, error = %e, "admin connection error");
                        }
                    }
                    _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            });
        }
    });
    Ok(AdminServer { local_addr, task })
}

async fn route(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn healthz_is_ok_and_other_paths_are_404() {
        let shutdown = CancellationToken::new();
        let server = serve("127.0.0.1:0", shutdown.clone()).await.unwrap();
        let ok = get(server.local_addr, "/healthz").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("ok\n"), "{ok}");
        let missing = get(server.local_addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        shutdown.cancel();
        server.task.await.unwrap();
    }
}
