//! The marks endpoint of `sessionguard exec`: test runners post when each
//! test began and ended, in which process, at what time
//! (`integrations/PROTOCOL.md`, version 1), and this module keeps those
//! marks for the report (`crate::attribution` pairs them into intervals).
//!
//! It owns the HTTP server (hyper 1, HTTP/1.1 with keep-alive, loopback
//! only), the validation of a request body (a mark or a non-empty array of
//! marks, all or nothing) and the bounded store. A batch is recorded before
//! its `204` is written, so a client that read the `204` may exit without
//! losing it. It never touches the proxy's data path: it runs on its own
//! tasks, parses large bodies off the async workers, and holds its lock only
//! to append. It never logs test names or files (a count and a reason only).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::text;

/// The environment variable `exec` sets for its child.
pub(crate) const MARKS_ENV_VAR: &str = "SESSIONGUARD_MARKS_URL";
/// The endpoint's path (the URL in [`MARKS_ENV_VAR`] names it).
pub(crate) const MARKS_PATH: &str = "/marks";
/// The largest body accepted: the protocol promises at least 16 MiB.
pub(crate) const MAX_BODY: usize = 16 << 20;
/// Marks kept at most (two per test: half a million tests). Past it a
/// request is answered `503`, so the client stops (PROTOCOL: any non-2xx),
/// and the report says marks were dropped.
pub(crate) const MAX_MARKS: usize = 1_000_000;
/// Longest `test` or `file` accepted, in bytes: a name is not a document.
pub(crate) const MAX_NAME: usize = 4096;
/// Bodies larger than this are parsed on the blocking pool, not on an
/// async worker that the proxy's connections share.
const PARSE_INLINE: usize = 64 << 10;

/// `begin` or `end` of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Event {
    Begin,
    End,
}

/// One validated mark.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mark {
    pub event: Event,
    pub test: String,
    pub file: String,
    pub pid: u32,
    /// Unix epoch milliseconds, wall clock, as the runner stamped it.
    pub time: f64,
}

/// The marks received so far, bounded by [`MAX_MARKS`].
#[derive(Debug, Default)]
pub(crate) struct MarkStore {
    marks: Mutex<Vec<Mark>>,
    /// Marks refused because the store was full.
    dropped: AtomicU64,
    /// Requests answered with an error (bad body, too large, ...).
    rejected: AtomicU64,
}

impl MarkStore {
    /// Records a whole batch, or none of it when it does not fit.
    pub(crate) fn record(&self, batch: Vec<Mark>) -> Result<(), usize> {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if marks.len() + batch.len() > MAX_MARKS {
            let n = batch.len();
            self.dropped.fetch_add(n as u64, Ordering::Relaxed);
            return Err(n);
        }
        marks.extend(batch);
        Ok(())
    }

    /// A copy of every mark kept, in arrival order (which means nothing:
    /// attribution goes by time).
    pub(crate) fn snapshot(&self) -> Vec<Mark> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

/// Parses and validates a request body: one mark or a non-empty array of
/// marks. The error names the mark (by index in a batch) and the field.
pub(crate) fn parse_body(body: &[u8]) -> Result<Vec<Mark>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match value {
        serde_json::Value::Array(items) => {
            if items.is_empty() {
                return Err("empty array: send at least one mark".to_string());
            }
            items
                .iter()
                .enumerate()
                .map(|(index, item)| parse_mark(item).map_err(|e| format!("mark {index}: {e}")))
                .collect()
        }
        item @ serde_json::Value::Object(_) => Ok(vec![parse_mark(&item)?]),
        _ => Err("expected a mark object or an array of marks".to_string()),
    }
}

fn parse_mark(item: &serde_json::Value) -> Result<Mark, String> {
    let object = item.as_object().ok_or("a mark must be a JSON object")?;
    let field = |name: &str| object.get(name).ok_or(format!("missing `{name}`"));
    let event = match field("event")?.as_str() {
        Some("begin") => Event::Begin,
        Some("end") => Event::End,
        Some(_) => return Err("`event` must be \"begin\" or \"end\"".to_string()),
        None => return Err("`event` must be a string".to_string()),
    };
    let name = |key: &str, non_empty: bool| -> Result<String, String> {
        let text = field(key)?
            .as_str()
            .ok_or(format!("`{key}` must be a string"))?;
        if non_empty && text.is_empty() {
            return Err(format!("`{key}` must not be empty"));
        }
        if text.len() > MAX_NAME {
            return Err(format!("`{key}` is longer than {MAX_NAME} bytes"));
        }
        Ok(text.to_string())
    };
    let test = name("test", true)?;
    let file = name("file", false)?;
    let pid = field("pid")?
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .ok_or("`pid` must be an integer > 0")?;
    let time = field("time")?
        .as_f64()
        .filter(|time| time.is_finite() && *time > 0.0)
        .ok_or("`time` must be a number > 0 (Unix epoch milliseconds)")?;
    Ok(Mark {
        event,
        test,
        file,
        pid,
        time,
    })
}

/// A running marks endpoint.
#[derive(Debug)]
pub(crate) struct MarksServer {
    pub local_addr: SocketAddr,
    pub store: Arc<MarkStore>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl MarksServer {
    /// Binds 127.0.0.1 on a free port and serves until [`MarksServer::stop`].
    pub(crate) async fn start() -> std::io::Result<MarksServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local_addr = listener.local_addr()?;
        let store = Arc::new(MarkStore::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, store.clone(), shutdown.clone()));
        Ok(MarksServer {
            local_addr,
            store,
            shutdown,
            task,
        })
    }

    /// The URL for [`MARKS_ENV_VAR`].
    pub(crate) fn url(&self) -> String {
        format!("http://{}{MARKS_PATH}", self.local_addr)
    }

    /// Stops accepting and closes kept-alive connections. Every batch
    /// already answered is in the store.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, store: Arc<MarkStore>, shutdown: CancellationToken) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "marks endpoint: accept failed");
                    // Resource exhaustion: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let store = store.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(handle(&store, request).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "marks endpoint: connection error");
                    }
                }
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
        // Reap finished connection tasks so the set stays small.
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

async fn handle(store: &MarkStore, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let response = route(store, request).await;
    if !response.status().is_success() {
        store.rejected.fetch_add(1, Ordering::Relaxed);
    }
    response
}

async fn route(store: &MarkStore, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != MARKS_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found: marks go to POST {MARKS_PATH}"),
        );
    }
    if request.method() != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: POST marks as JSON".to_string(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_BODY} bytes: send at most 500 marks per request"),
            );
        }
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        }
    };
    let parsed = if body.len() > PARSE_INLINE {
        match tokio::task::spawn_blocking(move || parse_body(&body)).await {
            Ok(parsed) => parsed,
            Err(e) => Err(format!("cannot parse the body: {e}")),
        }
    } else {
        parse_body(&body)
    };
    let batch = match parsed {
        Ok(batch) => batch,
        Err(e) => {
            tracing::debug!(error = %e, "marks endpoint: bad request");
            return text(StatusCode::BAD_REQUEST, format!("bad marks: {e}\n"));
        }
    };
    match store.record(batch) {
        Ok(()) => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default(),
        Err(n) => {
            tracing::warn!(
                marks = n,
                kept = MAX_MARKS,
                "marks endpoint: store full, marks dropped"
            );
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("mark store full ({MAX_MARKS} marks): {n} marks dropped"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn one_mark_or_a_batch() {
        let one = parse_body(
            br#"{"event":"begin","test":"a b","file":"t/a.test.js","pid":42,"time":1767225600123.457,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            one,
            [Mark {
                event: Event::Begin,
                test: "a b".into(),
                file: "t/a.test.js".into(),
                pid: 42,
                time: 1767225600123.457
            }]
        );
        let batch = parse_body(
            br#"[{"event":"end","test":"x","file":"","pid":1,"time":5},{"event":"begin","test":"y","file":"f","pid":1,"time":6}]"#,
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].event, Event::End);
    }

    #[test]
    fn bad_bodies_are_named() {
        for (body, want) in [
            (&b"nope"[..], "not JSON"),
            (b"[]", "empty array"),
            (b"3", "expected a mark"),
            (b"[3]", "mark 0: a mark must be a JSON object"),
            (
                br#"{"test":"x","file":"","pid":1,"time":5}"#,
                "missing `event`",
            ),
            (
                br#"{"event":"start","test":"x","file":"","pid":1,"time":5}"#,
                "`event` must be",
            ),
            (
                br#"{"event":"end","test":"","file":"","pid":1,"time":5}"#,
                "`test` must not be empty",
            ),
            (
                br#"{"event":"end","test":"x","file":3,"pid":1,"time":5}"#,
                "`file` must be a string",
            ),
            (
                br#"{"event":"end","test":"x","file":"","pid":0,"time":5}"#,
                "`pid` must be an integer > 0",
            ),
            (
                br#"{"event":"end","test":"x","file":"","pid":1.5,"time":5}"#,
                "`pid` must be an integer > 0",
            ),
            (
                br#"{"event":"end","test":"x","file":"","pid":1,"time":"5"}"#,
                "`time` must be a number > 0",
            ),
            (
                br#"[{"event":"end","test":"x","file":"","pid":1,"time":5},{"event":"end","test":"x","file":"","pid":1}]"#,
                "mark 1: missing `time`",
            ),
        ] {
            let err = parse_body(body).unwrap_err();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_full_store_takes_no_part_of_a_batch() {
        let store = MarkStore::default();
        let mark = |n: u32| Mark {
            event: Event::Begin,
            test: "t".into(),
            file: String::new(),
            pid: n,
            time: 1.0,
        };
        store.record(vec![mark(1); MAX_MARKS - 1]).unwrap();
        assert_eq!(store.record(vec![mark(2), mark(3)]), Err(2));
        assert_eq!(store.dropped(), 2);
        store.record(vec![mark(4)]).unwrap();
        assert_eq!(store.snapshot().len(), MAX_MARKS);
    }

    /// One raw HTTP/1.1 exchange on a kept-alive connection: the status line.
    async fn exchange(stream: &mut tokio::net::TcpStream, request: &str) -> String {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the headers and the announced body are in.
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&reply));
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if reply.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    }

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn serves_the_protocol_on_one_kept_alive_connection() {
        let server = MarksServer::start().await.unwrap();
        assert!(server.url().starts_with("http://127.0.0.1:"));
        assert!(server.url().ends_with("/marks"));
        let mut stream = tokio::net::TcpStream::connect(server.local_addr)
            .await
            .unwrap();
        let ok = exchange(
            &mut stream,
            &post(
                "/marks",
                r#"[{"event":"begin","test":"t","file":"f","pid":7,"time":10.5},{"event":"end","test":"t","file":"f","pid":7,"time":12}]"#,
            ),
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 204"), "{ok}");
        // Recorded before the 204 was written.
        assert_eq!(server.store.snapshot().len(), 2);
        let bad = exchange(
            &mut stream,
            &post(
                "/marks",
                r#"[{"event":"begin","test":"t","file":"f","pid":7,"time":1},{"event":"end"}]"#,
            ),
        )
        .await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(bad.contains("mark 1: missing `test`"), "{bad}");
        assert_eq!(server.store.snapshot().len(), 2, "all or nothing");
        let wrong_path = exchange(&mut stream, &post("/other", "{}")).await;
        assert!(wrong_path.starts_with("HTTP/1.1 404"), "{wrong_path}");
        let get = exchange(
            &mut stream,
            "GET /marks HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        assert!(get.starts_with("HTTP/1.1 405"), "{get}");
        assert!(get.to_ascii_lowercase().contains("allow: post"), "{get}");
        assert_eq!(server.store.rejected(), 3);
        let store = server.store.clone();
        server.stop().await;
        assert_eq!(store.snapshot()[1].event, Event::End);
    }

    #[tokio::test]
    async fn refuses_bodies_over_the_limit() {
        let server = MarksServer::start().await.unwrap();
        let mut stream = tokio::net::TcpStream::connect(server.local_addr)
            .await
            .unwrap();
        let head = format!(
            "POST /marks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // All of it: the server reads past the limit before it answers, so
        // nothing is left unread to make it reset the connection.
        stream.write_all(&vec![b' '; MAX_BODY + 1]).await.unwrap();
        let mut reply = vec![0u8; 1024];
        let n = stream.read(&mut reply).await.unwrap();
        let reply = String::from_utf8_lossy(&reply[..n]);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        server.stop().await;
    }
}
