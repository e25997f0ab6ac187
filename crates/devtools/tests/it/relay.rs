//! `bench-relay`, compare.sh's floor: the load generator's workload runs
//! through it against the fast emulator without an error, it forwards a
//! frame that arrives in pieces whole, byte for byte, and it closes a
//! connection whose declared frame length is out of bounds.

use std::time::Duration;

use bson::{doc, Document};
use sessionguard_emulator::{Emulator, EmulatorConfig};
use sessionguard_protocol::wire::{op_msg, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn emulator_and_relay() -> (sessionguard_emulator::EmulatorHandle, std::net::SocketAddr) {
    let emulator = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            fast: true,
            record_frames: true,
            ..EmulatorConfig::default()
        },
    )
    .await
    .expect("the emulator starts");
    let relay = sessionguard_dev::relay::spawn("127.0.0.1:0".parse().unwrap(), emulator.addr())
        .expect("the relay starts");
    (emulator, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_runs_through_the_relay_without_errors() {
    let (_emulator, relay) = emulator_and_relay().await;
    super::bench_load::short_clean_load(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_in_pieces_is_forwarded_whole_and_answered() {
    let (emulator, relay) = emulator_and_relay().await;
    let body = bson::to_vec(&doc! { "ping": 1, "$db": "admin" }).unwrap();
    let frame = op_msg::encode(7, 0, MsgFlags::default(), &body);
    let mut client = TcpStream::connect(relay).await.unwrap();
    for piece in [&frame[..3], &frame[3..20], &frame[20..]] {
        client.write_all(piece).await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        let mut len = [0u8; 4];
        client.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::try_from(i32::from_le_bytes(len)).unwrap()];
        reply[..4].copy_from_slice(&len);
        client.read_exact(&mut reply[4..]).await?;
        std::io::Result::Ok(reply)
    })
    .await
    .expect("a reply within 10 s: the relay forwarded the whole frame")
    .expect("the relay keeps the connection open");
    let response_to = i32::from_le_bytes(reply[8..12].try_into().unwrap());
    assert_eq!(response_to, 7, "the reply answers the request");
    // OP_MSG: header (16), flags (4), section kind 0 (1), the body.
    let answer: Document = bson::from_slice(&reply[21..]).unwrap();
    assert_eq!(answer.get_f64("ok").ok(), Some(1.0), "{answer}");
    assert!(
        emulator
            .received_frames()
            .iter()
            .any(|got| got[..] == frame[..]),
        "the emulator got the frame byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_out_of_bounds_closes_the_connection() {
    let (_emulator, relay) = emulator_and_relay().await;
    let mut client = TcpStream::connect(relay).await.unwrap();
    client.write_all(&(-5_i32).to_le_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("the relay closes the connection");
    assert!(matches!(read, Ok(0)), "{read:?}");
}
