//! Replica sets and mongos routers through sessionguard: the emulator as a
//! three-member replica set (three listeners over one data set), the proxy
//! with one listener per member and one session engine, and the official Rust
//! driver connecting with `replicaSet=rs0` and no directConnection. The
//! driver is given proxy addresses only, and must never reach a member
//! directly: every address it opens is a proxy listener, every hello it sees
//! names proxy listeners only, and the members accepted exactly as many
//! connections as the proxy did.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use futures_util::FutureExt;
use mongodb::event::cmap::CmapEvent;
use mongodb::event::command::CommandEvent;
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;
use mongodb::{Client, ServerType};
use sessionguard::config::{MemberConfig, ProxyConfig};
use sessionguard::metrics::Metrics;
use sessionguard::start_proxy;
use sessionguard::EngineInspector;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle, Topology};
use sessionguard_engine::{RuleId, RulesConfig, SessionConfig, SessionEngine};
use sessionguard_protocol::wire::{self, legacy, Frame, Message, MsgHeader, HEADER_LEN};
use sessionguard_proxy::{CloseCause, ProxyHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{lsid, RawClient, Stack};
use sessionguard_test_support as common;

use common::WAIT;

/// Emulator members over one data set, and the proxy with one listener per
/// member around one session engine.
struct ReplicaSet {
    members: Vec<EmulatorHandle>,
    proxy: ProxyHandle,
    engine: Arc<SessionEngine>,
}

impl ReplicaSet {
    async fn start(count: usize, config: EmulatorConfig) -> ReplicaSet {
        // RUST_LOG=sessionguard=debug shows the emulator's command log.
        sessionguard_test_support::logs::install();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = Emulator::start(loopback, config)
            .await
            .expect("emulator starts");
        let mut members = vec![first];
        for _ in 1..count {
            let state = members[0].state();
            members.push(Emulator::start_member(loopback, state).await.unwrap());
        }
        let hosts: Vec<String> = members.iter().map(|m| m.addr().to_string()).collect();
        let cfg = ProxyConfig {
            upstream: format!("mongodb://{}/?replicaSet=rs0", hosts.join(",")),
            members: hosts
                .iter()
                .map(|host| MemberConfig {
                    upstream: host.clone(),
                    listen: "127.0.0.1:0".to_string(),
                    advertise: None,
                })
                .collect(),
            ..ProxyConfig::default()
        };
        let engine = Arc::new(SessionEngine::new(
            &SessionConfig::default(),
            &RulesConfig::default(),
        ));
        let proxy = start_proxy(
            &cfg,
            Arc::new(EngineInspector::new(engine.clone())),
            &Metrics::new(),
        )
        .await
        .expect("proxy starts");
        ReplicaSet {
            members,
            proxy,
            engine,
        }
    }

    /// The proxy listener of member `index` (what drivers are told).
    fn proxy_addr(&self, index: usize) -> String {
        let wanted = self.members[index].addr().to_string();
        let listener = self
            .proxy
            .listeners()
            .iter()
            .find(|l| l.upstream.to_string() == wanted)
            .expect("a listener per member");
        listener
            .advertised
            .clone()
            .expect("advertised in member mode")
    }

    fn proxy_addrs(&self) -> BTreeSet<String> {
        (0..self.members.len())
            .map(|i| self.proxy_addr(i))
            .collect()
    }

    fn member_addrs(&self) -> BTreeSet<String> {
        self.members.iter().map(|m| m.addr().to_string()).collect()
    }

    /// Every connection a member accepted was dialed by the proxy: the
    /// proxy dials exactly one upstream connection per accepted client, so
    /// any connection the driver made to a member directly would show up as
    /// one more peer than the proxy accepted.
    async fn assert_members_only_saw_the_proxy(&self) {
        let peers = || self.members[0].peers().len() as u64;
        let settled =
            Stack::eventually(WAIT, || peers() == self.proxy.accepted_connections()).await;
        assert!(
            settled,
            "members accepted {} connections, the proxy accepted {}",
            peers(),
            self.proxy.accepted_connections()
        );
        assert!(peers() > 0);
    }

    async fn stop(self) {
        self.proxy.shutdown_now();
        self.proxy.wait().await;
        for member in self.members {
            member.shutdown().await;
        }
    }
}

/// What the driver did, from its own monitoring events.
#[derive(Default)]
struct Seen {
    sdam: Mutex<Vec<SdamEvent>>,
    connections_to: Mutex<BTreeSet<String>>,
    commands: Mutex<Vec<(String, String)>>,
}

impl Seen {
    fn servers_opened(&self) -> BTreeSet<String> {
        self.sdam
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                SdamEvent::ServerOpening(o) => Some(o.address.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Every address named in a hello reply the driver's monitors received.
    fn addresses_in_hellos(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for event in self.sdam.lock().unwrap().iter() {
            let SdamEvent::ServerHeartbeatSucceeded(h) = event else {
                continue;
            };
            for field in ["hosts", "passives", "arbiters"] {
                if let Ok(list) = h.reply.get_array(field) {
                    out.extend(list.iter().filter_map(Bson::as_str).map(str::to_string));
                }
            }
            for field in ["primary", "me"] {
                if let Ok(address) = h.reply.get_str(field) {
                    out.insert(address.to_string());
                }
            }
        }
        out
    }

    fn became(&self, address: &str, wanted: ServerType) -> bool {
        self.sdam.lock().unwrap().iter().any(|e| {
            matches!(e, SdamEvent::ServerDescriptionChanged(c)
                if c.address.to_string() == address && c.new_description.server_type() == wanted)
        })
    }

    fn awaited_heartbeats(&self) -> usize {
        self.sdam
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, SdamEvent::ServerHeartbeatSucceeded(h) if h.awaited))
            .count()
    }

    /// The addresses `command` was sent to, in order.
    fn sent(&self, command: &str) -> Vec<String> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name == command)
            .map(|(_, address)| address.clone())
            .collect()
    }
}

async fn client(uri: &str, seen: &Arc<Seen>) -> Client {
    let mut options = ClientOptions::parse(uri).await.expect("uri parses");
    let sink = seen.clone();
    options.sdam_event_handler = Some(EventHandler::callback(move |e| {
        sink.sdam.lock().unwrap().push(e)
    }));
    let sink = seen.clone();
    options.cmap_event_handler = Some(EventHandler::callback(move |e| {
        if let CmapEvent::ConnectionCreated(c) = e {
            sink.connections_to
                .lock()
                .unwrap()
                .insert(c.address.to_string());
        }
    }));
    let sink = seen.clone();
    options.command_event_handler = Some(EventHandler::callback(move |e| {
        if let CommandEvent::Started(s) = e {
            sink.commands
                .lock()
                .unwrap()
                .push((s.command_name, s.connection.address.to_string()));
        }
    }));
    Client::with_options(options).expect("client")
}

#[tokio::test]
async fn driver_discovers_the_set_through_the_proxy_and_never_reaches_a_member() {
    let rs = ReplicaSet::start(3, EmulatorConfig::default()).await;
    let seen = Arc::new(Seen::default());
    // Seeded with one proxy listener only: the other two can only be
    // learned from the (rewritten) hello.
    let client = client(
        &format!(
            "mongodb://{}/?replicaSet=rs0&serverSelectionTimeoutMS=5000",
            rs.proxy_addr(1)
        ),
        &seen,
    )
    .await;

    let coll = client.database("app").collection::<Document>("orders");
    coll.insert_one(doc! { "_id": 1, "qty": 5 }).await.unwrap();
    coll.insert_many(vec![
        doc! { "_id": 2, "qty": 1 },
        doc! { "_id": 3, "qty": 9 },
    ])
    .await
    .unwrap();
    coll.update_one(doc! { "_id": 2 }, doc! { "$set": { "qty": 2 } })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 3 }).await.unwrap();
    let found = coll.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    assert_eq!(found.get_i32("qty").unwrap(), 2);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);

    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": 10 })
        .session(&mut session)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": 1 }, doc! { "$inc": { "qty": 1 } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    // `Client::shutdown` waits for every session handle to be dropped.
    drop(session);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 3);
    let one = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(one.get_i32("qty").unwrap(), 6);

    // Writes went to the primary (member 0) through its proxy listener.
    let inserts = seen.sent("insert");
    assert!(!inserts.is_empty());
    assert!(
        inserts.iter().all(|a| *a == rs.proxy_addr(0)),
        "{inserts:?} should all be {}",
        rs.proxy_addr(0)
    );
    // Let every monitor report at least once.
    let all_known = Stack::eventually(WAIT, || seen.servers_opened() == rs.proxy_addrs()).await;
    let opened = seen.servers_opened();
    client.shutdown().await;

    assert!(
        all_known,
        "the driver discovered {opened:?}, not {:?}",
        rs.proxy_addrs()
    );
    let in_hellos = seen.addresses_in_hellos();
    assert!(
        in_hellos.is_subset(&rs.proxy_addrs()) && !in_hellos.is_empty(),
        "hellos named {in_hellos:?}; members are {:?}",
        rs.member_addrs()
    );
    let connected = seen.connections_to.lock().unwrap().clone();
    assert!(
        connected.is_subset(&rs.proxy_addrs()),
        "the driver opened connections to {connected:?}"
    );
    assert!(connected.is_disjoint(&rs.member_addrs()));
    rs.assert_members_only_saw_the_proxy().await;
    rs.stop().await;
}

#[tokio::test]
async fn a_primary_change_is_streamed_through_the_proxy_and_writes_follow_it() {
    let rs = ReplicaSet::start(3, EmulatorConfig::default()).await;
    let seen = Arc::new(Seen::default());
    // A heartbeat interval far longer than the test's wait: only the
    // streaming protocol (an exhaust hello answered at once on a topology
    // change) can tell the driver about the new primary in time.
    let client = client(
        &format!(
            "mongodb://{},{}/?replicaSet=rs0&heartbeatFrequencyMS=60000&serverSelectionTimeoutMS=8000",
            rs.proxy_addr(0),
            rs.proxy_addr(2)
        ),
        &seen,
    )
    .await;
    let coll = client.database("app").collection::<Document>("events");
    coll.insert_one(doc! { "_id": "before" }).await.unwrap();
    let streaming = Stack::eventually(WAIT, || {
        seen.became(&rs.proxy_addr(0), ServerType::RsPrimary)
            && seen.became(&rs.proxy_addr(2), ServerType::RsSecondary)
    })
    .await;
    assert!(
        streaming,
        "the driver saw member 0 as primary through the proxy"
    );

    let switched = Instant::now();
    rs.members[2].set_primary(true);
    let followed = Stack::eventually(WAIT, || {
        seen.became(&rs.proxy_addr(2), ServerType::RsPrimary)
            && seen.became(&rs.proxy_addr(0), ServerType::RsSecondary)
    })
    .await;
    assert!(
        followed,
        "the driver never saw the new primary; awaited heartbeats: {}",
        seen.awaited_heartbeats()
    );
    assert!(
        switched.elapsed() < Duration::from_secs(5),
        "the change arrived by polling, not streaming"
    );
    assert!(
        seen.awaited_heartbeats() > 0,
        "streamed hellos were received"
    );

    tokio::time::timeout(WAIT, coll.insert_one(doc! { "_id": "after" }))
        .await
        .expect("the write is not stuck")
        .expect("the write succeeds on the new primary");
    let inserts = seen.sent("insert");
    assert_eq!(
        inserts,
        vec![rs.proxy_addr(0), rs.proxy_addr(2)],
        "the second write went to the new primary's proxy listener"
    );
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    client.shutdown().await;
    rs.assert_members_only_saw_the_proxy().await;
    rs.stop().await;
}

#[tokio::test]
async fn one_ledger_sees_a_session_misused_across_two_member_listeners() {
    let mut config = EmulatorConfig::default();
    // Both overlapping commands are slow: requests on two connections can
    // reach the proxy in either order under load, and whichever comes first
    // must still be in flight when the other arrives.
    for command in ["find", "count"] {
        config
            .command_latency
            .insert(command.to_string(), Duration::from_millis(400));
    }
    let rs = ReplicaSet::start(3, config).await;
    let session = lsid(7);
    let on_primary: SocketAddr = rs.proxy_addr(0).parse().unwrap();
    let on_secondary: SocketAddr = rs.proxy_addr(1).parse().unwrap();
    let mut first = RawClient::hello(on_primary, "worker").await;
    let mut second = RawClient::hello(on_secondary, "worker").await;

    // The same session in flight on two members' listeners at once.
    first
        .send(
            0,
            &doc! { "find": "jobs", "filter": {}, "lsid": session.clone(), "$db": "app" },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    second
        .send(
            0,
            &doc! {
                // Another operation, not a retry of the find (which a driver
                // may legitimately send to another member).
                "count": "jobs", "query": {}, "lsid": session.clone(), "$db": "app",
                "$readPreference": { "mode": "secondaryPreferred" },
            },
        )
        .await;
    first.read_reply().await;
    second.read_reply().await;
    let engine = rs.engine.clone();
    let fired = Stack::eventually(WAIT, || {
        engine
            .violations()
            .iter()
            .any(|v| v.rule == RuleId::ConcurrentUse)
    })
    .await;
    assert!(fired, "concurrent use across members was not detected");

    // Ended through one member's listener, used through another's.
    first
        .command(doc! { "endSessions": [session.clone()], "$db": "admin" })
        .await;
    second
        .command(doc! { "ping": 1, "lsid": session.clone(), "$db": "admin" })
        .await;
    let engine = rs.engine.clone();
    let fired = Stack::eventually(WAIT, || {
        engine
            .violations()
            .iter()
            .any(|v| v.rule == RuleId::UseAfterEnd)
    })
    .await;
    assert!(fired, "use after end across members was not detected");
    drop((first, second));
    rs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_stepping_down_under_load_raises_nothing_and_the_retries_are_counted() {
    // Retryable writes and transactions from the Rust driver while the
    // primary steps down and closes every connection: the driver retries on
    // the new primary (same lsid and txnNumber), exactly as its
    // specifications say. Correct application, so nothing may be reported;
    // the cut requests are counted by why they were cut, the retries as
    // retries, and every write is stored exactly once.
    const WRITERS: usize = 4;
    let mut config = EmulatorConfig::default();
    // Slow writes, so that some are certainly in flight at the step-down.
    for command in ["insert", "update"] {
        config
            .command_latency
            .insert(command.to_string(), Duration::from_millis(60));
    }
    let rs = ReplicaSet::start(3, config).await;
    let uri = format!(
        "mongodb://{}/?replicaSet=rs0&retryWrites=true&serverSelectionTimeoutMS=8000&appName=failover",
        rs.proxy_addrs().into_iter().collect::<Vec<_>>().join(",")
    );
    let client = Client::with_uri_str(&uri).await.unwrap();
    let db = client.database("app");
    let items = db.collection::<Document>("failover");
    let counters = db.collection::<Document>("counters");
    counters
        .insert_one(doc! { "_id": "c", "n": 0 })
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped =
        |stop: &Arc<std::sync::atomic::AtomicBool>| stop.load(std::sync::atomic::Ordering::Relaxed);
    let mut writers = Vec::new();
    for worker in 0..WRITERS {
        let (items, stop) = (items.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut written = 0u64;
            while !stopped(&stop) {
                items
                    .insert_one(doc! { "_id": format!("w{worker}-{written}") })
                    .await?;
                written += 1;
            }
            mongodb::error::Result::Ok(written)
        }));
    }
    let transactions = {
        let (client, counters, stop) = (client.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            let mut committed = 0i32;
            while !stopped(&stop) {
                let mut session = client.start_session().await?;
                session
                    .start_transaction()
                    .and_run(counters.clone(), |session, counters| {
                        async move {
                            counters
                                .update_one(doc! { "_id": "c" }, doc! { "$inc": { "n": 1 } })
                                .session(&mut *session)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await?;
                committed += 1;
            }
            mongodb::error::Result::Ok(committed)
        })
    };
    let primary = &rs.members[0];
    assert!(
        Stack::eventually(WAIT, || primary.command_count("insert") >= 20
            && primary.command_count("update") >= 3)
        .await
    );
    let mut stepper = RawClient::hello(rs.proxy_addr(0).parse().unwrap(), "ops").await;
    let stepped = stepper
        .command(doc! { "replSetStepDown": 60, "secondaryCatchUpPeriodSecs": 0, "$db": "admin" })
        .await;
    assert_eq!(stepped.get_f64("ok").unwrap(), 1.0, "{stepped:?}");
    assert!(!rs.members[0].is_primary());
    // Work goes on against the new primary, then stops.
    let inserts_at_step_down = primary.command_count("insert");
    assert!(
        Stack::eventually(WAIT, || primary.command_count("insert")
            >= inserts_at_step_down + 40)
        .await,
        "writes resumed after the step-down"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer
            .await
            .unwrap()
            .expect("retryable writes survive the step-down");
    }
    let committed = transactions
        .await
        .unwrap()
        .expect("transactions survive the step-down");

    // Exactly once.
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), written);
    let counter = counters
        .find_one(doc! { "_id": "c" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter.get_i32("n").unwrap(), committed);
    // Nothing reported; the cut requests counted by cause, the retries seen.
    let engine = rs.engine.clone();
    assert_eq!(
        engine
            .violations()
            .iter()
            .map(|v| v.rule)
            .collect::<Vec<_>>(),
        vec![],
        "a failover is not misuse"
    );
    let stats = engine.stats();
    let cut: u64 = [CloseCause::UpstreamClosed, CloseCause::UpstreamError]
        .iter()
        .map(|cause| stats.in_flight_abandoned[cause.index()])
        .sum();
    assert!(
        cut >= 1,
        "requests were in flight at the step-down: {stats:?}"
    );
    assert!(
        stats.retries.get("insert") >= 1,
        "the driver's retried writes are visible: {stats:?}"
    );
    client.shutdown().await;
    drop(stepper);
    rs.stop().await;
}

/// Reads one reply frame (any opcode) and returns its first document.
async fn read_document(stream: &mut TcpStream) -> (MsgHeader, Document) {
    let mut header = [0u8; HEADER_LEN];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("a reply in time")
        .expect("a reply header");
    let parsed = MsgHeader::parse(&header).unwrap();
    let mut bytes = header.to_vec();
    bytes.resize(usize::try_from(parsed.message_length).unwrap(), 0);
    stream.read_exact(&mut bytes[HEADER_LEN..]).await.unwrap();
    let frame = Frame {
        header: parsed,
        bytes: bytes.into(),
    };
    let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    let document = match opened.parse(&frame).unwrap() {
        Message::Msg(m) => Document::try_from(m.body).unwrap(),
        Message::Reply(r) => Document::try_from(r.first().unwrap()).unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    (parsed, document)
}

#[tokio::test]
async fn legacy_op_query_is_master_is_rewritten_too() {
    let rs = ReplicaSet::start(3, EmulatorConfig::default()).await;
    let mut stream = TcpStream::connect(rs.proxy_addr(1)).await.unwrap();
    let query = bson::to_vec(&doc! { "isMaster": 1, "helloOk": true }).unwrap();
    let frame = legacy::encode_query(77, 0, "admin.$cmd", 0, -1, &query);
    stream.write_all(&frame).await.unwrap();
    let (header, reply) = read_document(&mut stream).await;
    assert_eq!(header.response_to, 77);
    assert_eq!(header.op_code, wire::OpCode::Reply);
    assert_eq!(reply.get_str("me").unwrap(), rs.proxy_addr(1));
    assert_eq!(reply.get_str("primary").unwrap(), rs.proxy_addr(0));
    let hosts: BTreeSet<String> = reply
        .get_array("hosts")
        .unwrap()
        .iter()
        .filter_map(Bson::as_str)
        .map(str::to_string)
        .collect();
    assert_eq!(hosts, rs.proxy_addrs());
    assert_eq!(
        reply.get_str("setName").unwrap(),
        "rs0",
        "other fields kept"
    );
    assert!(!reply.get_bool("ismaster").unwrap());
    rs.stop().await;
}

#[tokio::test]
async fn mongos_routers_behind_two_listeners_work_as_is() {
    let config = EmulatorConfig {
        topology: Topology::Mongos,
        ..EmulatorConfig::default()
    };
    // Two routers in front of one cluster (one data set).
    let rs = ReplicaSet::start(2, config).await;
    let seen = Arc::new(Seen::default());
    let client = client(
        &format!(
            "mongodb://{},{}/?serverSelectionTimeoutMS=5000",
            rs.proxy_addr(0),
            rs.proxy_addr(1)
        ),
        &seen,
    )
    .await;
    let coll = client.database("app").collection::<Document>("carts");
    for id in 0..20 {
        coll.insert_one(doc! { "_id": id }).await.unwrap();
    }
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 20);
    let routers = Stack::eventually(WAIT, || {
        seen.became(&rs.proxy_addr(0), ServerType::Mongos)
            && seen.became(&rs.proxy_addr(1), ServerType::Mongos)
    })
    .await;
    assert!(routers, "both proxy listeners were seen as mongos routers");
    let used: BTreeSet<String> = seen.sent("insert").into_iter().collect();
    assert!(used.is_subset(&rs.proxy_addrs()), "{used:?}");
    let connected = seen.connections_to.lock().unwrap().clone();
    client.shutdown().await;
    assert!(connected.is_subset(&rs.proxy_addrs()), "{connected:?}");
    rs.assert_members_only_saw_the_proxy().await;
    rs.stop().await;
}
