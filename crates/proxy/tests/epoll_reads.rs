//! The epoll driver's reads after the short-read patch (vendor/monoio,
//! PATCHES.md): a read that fills less than its buffer clears the socket's
//! read readiness, so the next read waits for epoll instead of failing once
//! with EAGAIN. These tests hold the two ways that could lose data or hang:
//! data arriving after the drain must still wake the reader, and an end of
//! stream epoll already reported must be read at once (no new edge will
//! ever come for it). Each read is bounded, so a lost wake-up fails the test
//! instead of hanging it. The first test shows the patch in effect through
//! the driver's cached readiness (what the next read would act on); the
//! syscalls it saves are measured, not asserted: `bench/syscalls.sh`.

use std::io::Write;
use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::mpsc;
use std::time::Duration;

use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;
use monoio::time::TimeDriver;
use monoio::{LegacyDriver, RuntimeBuilder};

/// Far longer than any wake-up takes; only a lost one reaches it.
const BOUND: Duration = Duration::from_secs(10);

fn epoll_runtime() -> monoio::Runtime<TimeDriver<LegacyDriver>> {
    RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("an epoll runtime")
}

/// A connected pair: the std side for the peer's thread, and the accepted
/// side's std stream for the runtime to adopt.
fn pair() -> (StdStream, StdStream) {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let peer = StdStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    peer.set_nodelay(true).expect("nodelay");
    (peer, accepted)
}

async fn read_bounded(stream: &mut TcpStream, capacity: usize) -> Vec<u8> {
    let (result, buf) = monoio::time::timeout(BOUND, stream.read(Vec::with_capacity(capacity)))
        .await
        .expect("the read was never woken");
    result.expect("read");
    buf
}

#[test]
fn a_short_read_leaves_the_socket_not_readable_until_epoll_says_so() {
    let (mut peer, accepted) = pair();
    peer.write_all(b"ping").expect("write");
    epoll_runtime().block_on(async move {
        let mut stream = TcpStream::from_std(accepted).expect("adopt");
        let data = read_bounded(&mut stream, 1024).await;
        assert_eq!(data, b"ping", "a short read: 4 of 1024 bytes");
        // `readable(true)` answers from the driver's cached readiness, as
        // the next read's first step does. Unpatched, the cache still says
        // readable (the next read would try recv and fail with EAGAIN);
        // patched, it waits for epoll's next event, and none comes.
        let claimed = monoio::time::timeout(Duration::from_millis(200), stream.readable(true));
        assert!(
            claimed.await.is_err(),
            "after a short read the driver still claimed the socket readable"
        );
        peer.write_all(b"pong").expect("write");
        let next = read_bounded(&mut stream, 1024).await;
        assert_eq!(next, b"pong");
    });
}

#[test]
fn data_arriving_after_a_short_read_still_wakes_the_reader() {
    let (mut peer, accepted) = pair();
    let (go, wait) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        peer.write_all(b"first").expect("write");
        // The second piece is sent only once the first was read short
        // (readiness cleared) and the reader is waiting again.
        wait.recv().expect("go");
        std::thread::sleep(Duration::from_millis(50));
        peer.write_all(b"second").expect("write");
        wait.recv().expect("done");
    });
    epoll_runtime().block_on(async move {
        let mut stream = TcpStream::from_std(accepted).expect("adopt");
        let first = read_bounded(&mut stream, 1024).await;
        assert_eq!(first, b"first", "a short read: 5 of 1024 bytes");
        go.send(()).expect("go");
        let second = read_bounded(&mut stream, 1024).await;
        assert_eq!(second, b"second");
        go.send(()).expect("done");
    });
    writer.join().expect("writer");
}

#[test]
fn an_end_of_stream_reported_with_the_last_data_is_read_at_once() {
    let (mut peer, accepted) = pair();
    // Data and FIN are both on the socket before the reader first waits
    // (loopback delivers them within the sending calls), so one epoll event
    // reports them together; after the short read clears READABLE, only the
    // kept READ_CLOSED can let the next read through.
    peer.write_all(b"last words").expect("write");
    peer.shutdown(Shutdown::Write).expect("shutdown");
    epoll_runtime().block_on(async move {
        let mut stream = TcpStream::from_std(accepted).expect("adopt");
        let data = read_bounded(&mut stream, 1024).await;
        assert_eq!(data, b"last words");
        let end = read_bounded(&mut stream, 1024).await;
        assert!(end.is_empty(), "the end of stream, read at once");
    });
    drop(peer);
}

#[test]
fn a_read_that_fills_its_buffer_leaves_the_rest_to_the_next_read() {
    let (mut peer, accepted) = pair();
    // 64 KiB read 1 KiB at a time: every read but the last is full, and
    // nothing is waited for while bytes are queued.
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let writer = std::thread::spawn(move || {
        peer.write_all(&payload).expect("write");
        peer.shutdown(Shutdown::Write).expect("shutdown");
        peer
    });
    epoll_runtime().block_on(async move {
        let mut stream = TcpStream::from_std(accepted).expect("adopt");
        let mut received = Vec::new();
        loop {
            let chunk = read_bounded(&mut stream, 1024).await;
            if chunk.is_empty() {
                break;
            }
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "every byte, in order");
    });
    drop(writer.join().expect("writer"));
}
