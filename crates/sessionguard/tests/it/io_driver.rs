//! The data path's I/O driver (`proxy.io`): chosen once at start, logged
//! with the reason, and each one relays. `SESSIONGUARD_IO` overrides the
//! configuration (CI runs the suite a second time with it set to epoll),
//! so the expectations follow it when it is set.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::sync::Arc;

use bson::doc;
use futures_util::StreamExt;
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard::start_proxy;
use sessionguard_emulator::{Emulator, EmulatorConfig};
use sessionguard_protocol::wire::{op_msg, FrameCodec, MsgFlags};
use sessionguard_proxy::{io_uring_unavailable, Driver, IoMode, NoopInspector, IO_ENV};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

/// The driver and the reason `mode` must give on this machine.
fn expected(mode: IoMode) -> (Driver, String) {
    let (mode, source) = match std::env::var(IO_ENV) {
        Ok(forced) => (forced.parse().expect("a valid SESSIONGUARD_IO"), IO_ENV),
        Err(_) => (mode, "proxy.io"),
    };
    match mode {
        IoMode::Epoll => (Driver::Epoll, format!("{source} = epoll")),
        IoMode::IoUring => (Driver::IoUring, format!("{source} = io_uring")),
        IoMode::Auto => (
            Driver::IoUring,
            format!("{source} = auto: io_uring available"),
        ),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_driver_is_chosen_once_logged_with_its_reason_and_relays() {
    // This kernel has io_uring (CI's too): `auto` must not fall back here.
    assert_eq!(io_uring_unavailable(), None);
    let emu = Emulator::start(
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        EmulatorConfig::default(),
    )
    .await
    .expect("emulator starts");
    for mode in [IoMode::Auto, IoMode::IoUring, IoMode::Epoll] {
        let logs = common::ThreadLogs::default();
        let _guard = logs.install_at(tracing::Level::INFO);
        let config = ProxyConfig {
            listen: "127.0.0.1:0".to_string(),
            upstream: format!("mongodb://{}", emu.addr()),
            admin: "127.0.0.1:0".to_string(),
            io: mode,
            ..ProxyConfig::default()
        };
        let proxy = start_proxy(&config, Arc::new(NoopInspector), &Metrics::new())
            .await
            .expect("proxy starts");
        let (driver, reason) = expected(mode);
        assert_eq!(proxy.driver().driver, driver, "{mode:?}");
        assert_eq!(proxy.driver().reason, reason, "{mode:?}");
        let lines: Vec<String> = logs
            .proxy_lines()
            .into_iter()
            .filter(|l| l.contains("data path I/O driver"))
            .collect();
        assert_eq!(lines.len(), 1, "one line per start: {lines:#?}");
        assert!(
            lines[0].contains(&format!("driver={driver}"))
                && lines[0].contains(&format!("reason={reason}")),
            "{mode:?}: {}",
            lines[0]
        );

        // And it relays: a hello and its reply, byte-exact framing.
        let body = bson::to_vec(&doc! { "hello": 1, "$db": "admin" }).unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        stream
            .write_all(&op_msg::encode(7, 0, MsgFlags::default(), &body))
            .await
            .unwrap();
        let mut frames = FramedRead::new(stream, FrameCodec::default());
        let reply = frames.next().await.expect("a reply").expect("a frame");
        assert_eq!(reply.header.response_to, 7, "{mode:?}");
        proxy.shutdown_now();
        proxy.wait().await;
    }
}
