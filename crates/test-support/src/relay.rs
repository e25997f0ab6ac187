//! A TCP relay a test puts between two parts of the stack: it forwards both
//! directions (closing each side when the other does), counts the
//! connections it carried, can reset every open one (RST, as a crashed host
//! or a middlebox does), and, as a tap, keeps every byte clients sent. It
//! must not change a byte it forwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What clients sent, one buffer per connection carried.
type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

pub struct Relay {
    pub addr: SocketAddr,
    reset: Arc<watch::Sender<u64>>,
    carried: Arc<AtomicU64>,
    sent: Option<Sent>,
    stop: CancellationToken,
}

impl Relay {
    /// A relay to `target` on an ephemeral loopback port.
    pub async fn start(target: SocketAddr) -> Relay {
        Relay::spawn(target, None).await
    }

    /// `start`, keeping every byte clients send (see `frames`).
    pub async fn tap(target: SocketAddr) -> Relay {
        Relay::spawn(target, Some(Sent::default())).await
    }

    async fn spawn(target: SocketAddr, sent: Option<Sent>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reset = Arc::new(watch::Sender::new(0u64));
        let carried = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (resets, count, stopped, record) =
            (reset.clone(), carried.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                count.fetch_add(1, Ordering::Relaxed);
                let record = record.as_ref().map(|sent| {
                    let mut streams = sent.lock().unwrap();
                    streams.push(Vec::new());
                    (sent.clone(), streams.len() - 1)
                });
                tokio::spawn(carry(
                    inbound,
                    target,
                    record,
                    resets.subscribe(),
                    stopped.clone(),
                ));
            }
        });
        Relay {
            addr,
            reset,
            carried,
            sent,
            stop,
        }
    }

    /// Resets every connection open now (new ones are carried normally).
    pub fn reset_all(&self) {
        self.reset.send_modify(|n| *n += 1);
    }

    /// Connections carried so far.
    pub fn carried(&self) -> u64 {
        self.carried.load(Ordering::Relaxed)
    }

    /// Every frame clients sent (a tap's), split by the length prefix.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let sent = self
            .sent
            .as_ref()
            .expect("a tap (Relay::tap) keeps what was sent");
        let mut frames = Vec::new();
        for stream in sent.lock().unwrap().iter() {
            let mut rest = stream.as_slice();
            while rest.len() >= 4 {
                let len = i32::from_le_bytes(rest[..4].try_into().unwrap());
                let len = usize::try_from(len).unwrap();
                if rest.len() < len {
                    break;
                }
                frames.push(rest[..len].to_vec());
                rest = &rest[len..];
            }
        }
        frames
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Carries one connection until both sides closed, or resets it.
async fn carry(
    mut inbound: TcpStream,
    target: SocketAddr,
    record: Option<(Sent, usize)>,
    mut resets: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        let _ = inbound.set_zero_linger();
        return;
    };
    let reset = {
        let (client_read, client_write) = inbound.split();
        let (upstream_read, upstream_write) = outbound.split();
        let both = async {
            tokio::join!(
                pump(client_read, upstream_write, record),
                pump(upstream_read, client_write, None),
            )
        };
        tokio::select! {
            _ = both => false,
            _ = resets.changed() => true,
            _ = stop.cancelled() => true,
        }
    };
    if reset {
        let _ = inbound.set_zero_linger();
        let _ = outbound.set_zero_linger();
    }
}

/// Copies `from` to `to` until EOF or an error, keeping a copy in `record`,
/// then closes `to`'s write side.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    record: Option<(Sent, usize)>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some((sent, index)) = &record {
                    sent.lock().unwrap()[*index].extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
