//! `sessionguard-dev bench-relay`: the floor bench/compare.sh measures
//! sessionguard against. A frame-aware relay with no inspection at all:
//! it reads whole MongoDB frames by their length prefix (as any inspecting
//! proxy must) and forwards every complete frame of a read with one write,
//! on one thread of the runtime the proxy's data threads run on (the same
//! driver choice, `proxy.io = auto` or `SESSIONGUARD_IO`, and the same
//! builder: `sessionguard_proxy::build_runtime`), with one task per
//! direction and one reusable buffer each. It is the design
//! `../shared/perf-notes.md` measured at 0.74-0.83x
//! HAProxy's CPU per operation, kept here so every compare.sh run says
//! what this machine allows a relay that does nothing else.
//!
//! It must stay a reference, not a product: no TLS, no limits beyond the
//! frame length, no drain, no metrics, no logging per connection. Nothing
//! in the shipped binary may use it.

use std::io;
use std::net::SocketAddr;

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use sessionguard_protocol::wire::{frame_len, DEFAULT_MAX_MESSAGE_SIZE};
use sessionguard_proxy::{build_runtime, choose_driver, IoMode};

const BUF_SIZE: usize = 16 * 1024;

/// `bench-relay` arguments.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Address to accept clients on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The MongoDB (or emulator) address every client is relayed to.
    #[arg(long)]
    pub upstream: SocketAddr,
}

/// Runs the relay until the process is killed; an error only if it cannot
/// start (the listener or the runtime).
pub fn run(args: RelayArgs) -> io::Result<()> {
    let listener = std::net::TcpListener::bind(args.listen)?;
    let local = listener.local_addr()?;
    serve(listener, args.upstream, |driver| {
        println!("bench-relay listening on {local} ({driver})");
    })
}

/// Starts the relay on a thread of its own (tests): its address.
pub fn spawn(listen: SocketAddr, upstream: SocketAddr) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("bench-relay".into())
        .spawn(move || {
            if let Err(e) = serve(listener, upstream, |_| {}) {
                eprintln!("bench-relay: {e}");
            }
        })?;
    Ok(local)
}

/// `started` is told which driver serves, and why (as the proxy logs it).
fn serve(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    started: impl FnOnce(&str),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let choice = choose_driver(IoMode::Auto)?;
    let mut runtime = build_runtime(choice.driver)?;
    started(&format!("{}: {}", choice.driver, choice.reason));
    runtime.block_on(async move { accept_loop(TcpListener::from_std(listener)?, upstream).await })
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr) -> io::Result<()> {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("bench-relay: accept failed: {e}");
                continue;
            }
        };
        monoio::spawn(async move {
            let server = match TcpStream::connect(upstream).await {
                Ok(server) => server,
                Err(e) => {
                    eprintln!("bench-relay: cannot reach {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            monoio::spawn(pump(server_read, client_write));
            pump(client_read, server_write).await;
        });
    }
}

/// How many bytes at the front of `buf` are complete frames, or `None` for
/// a declared length outside the proxy's default bounds.
fn complete_frames(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(len) = frame_len(&buf[at..], DEFAULT_MAX_MESSAGE_SIZE).ok()? {
        if buf.len() - at < len {
            break;
        }
        at += len;
    }
    Some(at)
}

/// One direction: read, forward the complete frames, keep the partial
/// tail at the front of the same buffer. Returns when either side ends or
/// a frame's length is out of bounds (both halves are dropped with it).
async fn pump<R: AsyncReadRent, W: AsyncWriteRent>(mut from: R, mut to: W) {
    let mut buf: Vec<u8> = Vec::with_capacity(BUF_SIZE);
    loop {
        // Room for the partial frame's declared length (checked when it
        // was read), and never a read into no room (it would read as the
        // peer's close).
        if let Ok(Some(len)) = frame_len(&buf, usize::MAX) {
            if len > buf.capacity() {
                buf.reserve_exact(len - buf.len());
            }
        }
        if buf.len() == buf.capacity() {
            buf.reserve(BUF_SIZE);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (read, slice) = from.read(monoio::buf::SliceMut::new(buf, len, cap)).await;
        buf = slice.into_inner();
        if !matches!(read, Ok(n) if n > 0) {
            return;
        }
        let Some(end) = complete_frames(&buf) else {
            return;
        };
        if end == 0 {
            continue;
        }
        let (written, slice) = to.write_all(monoio::buf::IoBuf::slice(buf, ..end)).await;
        buf = slice.into_inner();
        if written.is_err() {
            return;
        }
        buf.drain(..end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        bytes[..4].copy_from_slice(&i32::try_from(len).unwrap().to_le_bytes());
        bytes
    }

    #[test]
    fn complete_frames_stop_at_a_partial_one_and_refuse_bad_lengths() {
        let mut buf = frame(20);
        buf.extend(frame(30));
        assert_eq!(complete_frames(&buf), Some(50));
        buf.extend(&frame(40)[..10]);
        assert_eq!(complete_frames(&buf), Some(50));
        buf.truncate(52);
        assert_eq!(
            complete_frames(&buf),
            Some(50),
            "a partial length prefix waits"
        );
        assert_eq!(complete_frames(&frame(20)[..0]), Some(0));
        assert_eq!(complete_frames(&(-1_i32).to_le_bytes()), None);
        assert_eq!(complete_frames(&8_i32.to_le_bytes()), None);
        let too_large = i32::try_from(DEFAULT_MAX_MESSAGE_SIZE + 1).unwrap();
        assert_eq!(complete_frames(&too_large.to_le_bytes()), None);
    }
}
