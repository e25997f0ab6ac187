//! Interning: command names, namespaces, owners (`user@db`) and client
//! identities become small integer ids so per-session state holds no
//! strings and the hot path allocates nothing once a name has been seen.
//! Each table is bounded; past the bound new names share the "unknown" id
//! (evidence then says "?"), so a client inventing names cannot grow memory.
//!
//! No policy here and no logging: just the tables, and `Names`, the way
//! rules and findings turn ids back into names.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use foldhash::fast::RandomState;

use super::state::{ClientId, OwnerId, Sym};

/// The engine's concurrent maps: keys are ids, lsids or hashes already, so
/// SipHash's flooding resistance buys little over foldhash with a
/// per-process random seed, at several times the cost per lookup (it showed
/// as the largest single item in the per-frame profile).
pub(crate) type FastDashMap<K, V> = DashMap<K, V, RandomState>;

/// How many distinct names / identities each table keeps.
pub(crate) const DEFAULT_INTERN_LIMIT: usize = 100_000;

/// How many ids a thread remembers (`MEMO`) before it starts over: far
/// more than the command names and namespaces an application uses, small
/// enough that names a client invents cannot grow a thread's memory.
const MEMO_LIMIT: usize = 4096;

/// Tells tables apart in the per-thread memo (one process may hold many
/// engines, each with its own tables and seeds).
static NEXT_TABLE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Ids this thread already looked up, by (table, hash). The command
    /// name and namespace are interned on every request, and the shared
    /// table's shard lock is an atomic write on a cache line every data
    /// thread touches for the same name: with data threads on several
    /// cores that line moves between them on each request. An id never
    /// changes once handed out (tables only grow), so a thread may keep it.
    static MEMO: RefCell<HashMap<(u64, u64), u32, foldhash::fast::FixedState>> =
        RefCell::new(HashMap::with_hasher(foldhash::fast::FixedState::default()));
}

fn memo_get(table: u64, hash: u64) -> Option<u32> {
    MEMO.with(|memo| memo.borrow().get(&(table, hash)).copied())
}

fn memo_put(table: u64, hash: u64, id: u32) {
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert((table, hash), id);
    });
}

/// A bounded table of interned values keyed by a seeded hash. Id 0 is
/// "unknown": what every value past the bound gets.
#[derive(Debug)]
pub(crate) struct InternTable<V: ?Sized> {
    /// This table in the per-thread memo.
    table: u64,
    ids: FastDashMap<u64, u32>,
    values: FastDashMap<u32, Arc<V>>,
    /// Seeds the hash that keys `ids`: random per process, so values that
    /// collide (and would share an id) cannot be chosen by a client.
    seed: RandomState,
    /// The next id; also the bound check (`next - 1` ids were handed out),
    /// because `DashMap::len` locks every shard on every miss.
    next: AtomicU32,
    limit: usize,
    /// Lookups that reached the shared maps (tests check the memo).
    #[cfg(test)]
    shared_lookups: AtomicU64,
}

/// Command names, namespaces and owners.
pub(crate) type StringTable = InternTable<str>;

/// Interned client identities.
pub(crate) type IdentityTable = InternTable<ClientIdentity>;

impl<V: ?Sized> InternTable<V> {
    pub(crate) fn new(limit: usize) -> InternTable<V> {
        InternTable {
            table: NEXT_TABLE.fetch_add(1, Ordering::Relaxed),
            ids: FastDashMap::default(),
            values: FastDashMap::default(),
            seed: RandomState::default(),
            next: AtomicU32::new(1),
            limit,
            #[cfg(test)]
            shared_lookups: AtomicU64::new(0),
        }
    }

    /// The id of the value hashing to `hash`, interning `make()` when new
    /// and the table has room.
    fn intern_hashed(&self, hash: u64, make: impl FnOnce() -> Arc<V>) -> u32 {
        if let Some(id) = memo_get(self.table, hash) {
            return id;
        }
        let id = self.intern_shared(hash, make);
        // "Unknown" is not remembered: it is no id of this value's.
        if id != 0 {
            memo_put(self.table, hash, id);
        }
        id
    }

    fn intern_shared(&self, hash: u64, make: impl FnOnce() -> Arc<V>) -> u32 {
        #[cfg(test)]
        self.shared_lookups.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = self.ids.get(&hash) {
            return *id;
        }
        let handed_out = usize::try_from(self.next.load(Ordering::Relaxed))
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        if handed_out >= self.limit {
            return 0;
        }
        *self.ids.entry(hash).or_insert_with(|| {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.values.insert(id, make());
            id
        })
    }

    fn value(&self, id: u32) -> Option<Arc<V>> {
        self.values.get(&id).map(|v| v.clone())
    }
}

impl InternTable<str> {
    /// The hash of `parts` joined. foldhash is not a streaming hash (two
    /// writes differ from one write of the same bytes), so the parts are
    /// joined first: on the stack for any real name (namespaces are at
    /// most 255 bytes), on the heap past that.
    fn hash_joined(&self, parts: &[&str]) -> u64 {
        if let [whole] = parts {
            return self.seed.hash_one(whole.as_bytes());
        }
        let mut buffer = [0u8; 256];
        let mut used = 0usize;
        for part in parts {
            let Some(slot) = used
                .checked_add(part.len())
                .and_then(|end| buffer.get_mut(used..end))
            else {
                return self.seed.hash_one(parts.concat().as_bytes());
            };
            slot.copy_from_slice(part.as_bytes());
            used += part.len();
        }
        self.seed.hash_one(&buffer[..used])
    }

    /// The id of `parts` joined (so `db` + `.` + `collection` needs no
    /// temporary String when already known).
    pub(crate) fn intern_parts(&self, parts: &[&str]) -> u32 {
        self.intern_hashed(self.hash_joined(parts), || Arc::from(parts.concat()))
    }

    pub(crate) fn intern(&self, value: &str) -> u32 {
        self.intern_parts(&[value])
    }

    /// The string of `id`; "?" for unknown.
    pub(crate) fn resolve(&self, id: u32) -> Arc<str> {
        self.value(id).unwrap_or_else(|| Arc::from("?"))
    }

    pub(crate) fn get(&self, id: u32) -> Option<Arc<str>> {
        self.value(id)
    }

    /// The id of `value` if it was interned (no insertion).
    #[cfg(test)]
    pub(crate) fn lookup(&self, value: &str) -> Option<u32> {
        self.lookup_parts(&[value])
    }

    /// The id of `parts` joined if it was interned (no insertion, and no
    /// temporary String).
    pub(crate) fn lookup_parts(&self, parts: &[&str]) -> Option<u32> {
        self.ids.get(&self.hash_joined(parts)).map(|id| *id)
    }
}

/// Names for the ids a message mentions (rules format a message only when
/// they fire, so the lookups cost nothing on the quiet path).
pub(crate) trait Names {
    fn symbol(&self, sym: Sym) -> Arc<str>;
    fn identity(&self, id: ClientId) -> Option<Arc<ClientIdentity>>;
}

/// Who is on the other end of a connection, as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct ClientIdentity {
    /// The peer's address, normalised (IPv4-mapped IPv6 to IPv4, every
    /// loopback address to 127.0.0.1: one host talking to itself over
    /// several loopback addresses is still one host).
    pub peer: Option<IpAddr>,
    /// The handshake's `client` metadata was seen.
    pub metadata_seen: bool,
    pub driver_name: Option<Arc<str>>,
    pub driver_version: Option<Arc<str>>,
    pub app_name: Option<Arc<str>>,
    /// `user@db`, when the authentication was visible.
    pub user: Option<Arc<str>>,
}

impl ClientIdentity {
    /// The first field in which two identities certainly differ. Unknown
    /// parts never count as different: only what both sides show is compared.
    pub(crate) fn differs_from(&self, other: &ClientIdentity) -> Option<&'static str> {
        if let (Some(a), Some(b)) = (self.peer, other.peer) {
            if a != b {
                return Some("peer host");
            }
        }
        if self.metadata_seen && other.metadata_seen {
            if self.driver_name != other.driver_name {
                return Some("driver");
            }
            if self.driver_version != other.driver_version {
                return Some("driver version");
            }
            if self.app_name != other.app_name {
                return Some("application name");
            }
        }
        if let (Some(a), Some(b)) = (&self.user, &other.user) {
            if a != b {
                return Some("user");
            }
        }
        None
    }

    /// "app 'billing' (mongo-rust-driver 3.3.0) from 10.0.0.5 as alice@admin".
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        match &self.app_name {
            Some(app) => out.push_str(&format!("app '{app}'")),
            None => out.push_str("a client"),
        }
        if let Some(driver) = &self.driver_name {
            out.push_str(&format!(" ({driver}"));
            if let Some(version) = &self.driver_version {
                out.push_str(&format!(" {version}"));
            }
            out.push(')');
        }
        if let Some(peer) = self.peer {
            out.push_str(&format!(" from {peer}"));
        }
        if let Some(user) = &self.user {
            out.push_str(&format!(" as {user}"));
        }
        out
    }
}

/// Canonical form of a peer address for identity comparisons.
pub(crate) fn normalize_ip(ip: IpAddr) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if ip.is_loopback() {
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        ip
    }
}

impl InternTable<ClientIdentity> {
    pub(crate) fn intern(&self, identity: &ClientIdentity) -> ClientId {
        let hash = self.seed.hash_one(identity);
        ClientId(self.intern_hashed(hash, || Arc::new(identity.clone())))
    }

    pub(crate) fn get(&self, id: ClientId) -> Option<Arc<ClientIdentity>> {
        self.value(id.0)
    }
}

/// All the tables of one engine.
#[derive(Debug)]
pub(crate) struct Tables {
    pub symbols: StringTable,
    pub owners: StringTable,
    pub identities: IdentityTable,
}

impl Tables {
    pub(crate) fn new(limit: usize) -> Tables {
        Tables {
            symbols: StringTable::new(limit),
            owners: StringTable::new(limit),
            identities: IdentityTable::new(limit),
        }
    }

    pub(crate) fn symbol(&self, value: &str) -> Sym {
        Sym(self.symbols.intern(value))
    }

    pub(crate) fn namespace(&self, db: &str, collection: Option<&str>) -> Sym {
        match collection {
            Some(collection) => Sym(self.symbols.intern_parts(&[db, ".", collection])),
            None => Sym(self.symbols.intern(db)),
        }
    }

    pub(crate) fn owner(&self, user: &str, db: &str) -> OwnerId {
        OwnerId(self.owners.intern_parts(&[user, "@", db]))
    }

    /// The owner `user@db` if one was interned (kill patterns name users
    /// the proxy may never have seen; no insertion, no allocation).
    pub(crate) fn known_owner(&self, user: &str, db: &str) -> Option<OwnerId> {
        self.owners.lookup_parts(&[user, "@", db]).map(OwnerId)
    }

    pub(crate) fn owner_name(&self, owner: OwnerId) -> Option<Arc<str>> {
        if owner == OwnerId::UNKNOWN {
            return None;
        }
        self.owners.get(owner.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_asks_the_shared_table_once_per_name() {
        let table = StringTable::new(10);
        let find = table.intern("find");
        let namespace = table.intern_parts(&["shop", ".", "orders"]);
        for _ in 0..100 {
            assert_eq!(table.intern("find"), find);
            assert_eq!(table.intern_parts(&["shop", ".", "orders"]), namespace);
        }
        assert_eq!(table.shared_lookups.load(Ordering::Relaxed), 2);
        // Another thread asks once too, and gets the same ids.
        let elsewhere = std::thread::scope(|scope| {
            scope
                .spawn(|| (table.intern("find"), table.intern("find")))
                .join()
                .unwrap()
        });
        assert_eq!(elsewhere, (find, find));
        assert_eq!(table.shared_lookups.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn tables_do_not_share_a_threads_memo() {
        // Same thread, two tables with the same seed (so a name hashes the
        // same in both: only the table part of the memo's key tells them
        // apart): each hands out its own ids.
        let first = StringTable::new(10);
        let mut second = StringTable::new(10);
        second.seed = first.seed.clone();
        assert_eq!(first.intern("a"), 1);
        assert_eq!(second.intern("b"), 1);
        assert_eq!(second.intern("a"), 2);
        assert_eq!(first.intern("b"), 2);
        assert_eq!(&*second.resolve(second.intern("a")), "a");
    }

    #[test]
    fn past_the_bound_unknown_is_not_remembered_as_an_id() {
        let table = StringTable::new(1);
        assert_eq!(table.intern("first"), 1);
        assert_eq!(table.intern("second"), 0);
        assert_eq!(table.intern("second"), 0);
        // Every unknown asks again (cheap: the bound check), never a memo.
        assert_eq!(table.shared_lookups.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn strings_intern_to_stable_ids_and_resolve() {
        let table = StringTable::new(10);
        let find = table.intern("find");
        assert_ne!(find, 0);
        assert_eq!(table.intern("find"), find);
        assert_eq!(table.intern_parts(&["fi", "nd"]), find);
        // Past the stack buffer the joined name still hashes the same.
        let long = "n".repeat(300);
        let long_id = table.intern(&long);
        assert_eq!(table.intern_parts(&[&long[..100], &long[100..]]), long_id);
        assert_ne!(table.intern("insert"), find);
        assert_eq!(&*table.resolve(find), "find");
        assert_eq!(&*table.resolve(0), "?");
        assert_eq!(table.lookup("find"), Some(find));
        assert_eq!(table.lookup("nope"), None);
        assert_eq!(table.lookup_parts(&["fi", "nd"]), Some(find));
        assert_eq!(table.lookup_parts(&["no", "pe"]), None);
    }

    #[test]
    fn tables_are_bounded() {
        let table = StringTable::new(2);
        let a = table.intern("a");
        let b = table.intern("b");
        assert_eq!(table.intern("c"), 0);
        assert_eq!(table.intern("a"), a);
        assert_eq!(table.intern("b"), b);
    }

    #[test]
    fn identities_compare_only_what_both_sides_show() {
        let base = ClientIdentity {
            peer: Some(normalize_ip("10.0.0.5".parse().unwrap())),
            metadata_seen: true,
            driver_name: Some(Arc::from("nodejs")),
            driver_version: Some(Arc::from("6.8.0")),
            app_name: Some(Arc::from("web")),
            user: None,
        };
        assert_eq!(base.differs_from(&base.clone()), None);
        let other_host = ClientIdentity {
            peer: Some("10.0.0.6".parse().unwrap()),
            ..base.clone()
        };
        assert_eq!(base.differs_from(&other_host), Some("peer host"));
        let other_app = ClientIdentity {
            app_name: Some(Arc::from("worker")),
            ..base.clone()
        };
        assert_eq!(base.differs_from(&other_app), Some("application name"));
        let no_metadata = ClientIdentity {
            metadata_seen: false,
            driver_name: None,
            driver_version: None,
            app_name: None,
            ..base.clone()
        };
        assert_eq!(base.differs_from(&no_metadata), None);
        let with_user = ClientIdentity {
            user: Some(Arc::from("a@admin")),
            ..base.clone()
        };
        assert_eq!(base.differs_from(&with_user), None);
        let other_user = ClientIdentity {
            user: Some(Arc::from("b@admin")),
            ..base.clone()
        };
        assert_eq!(with_user.differs_from(&other_user), Some("user"));
    }

    #[test]
    fn loopback_and_mapped_addresses_normalise() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(normalize_ip("::1".parse().unwrap()), v4);
        assert_eq!(normalize_ip("127.0.0.2".parse().unwrap()), v4);
        assert_eq!(
            normalize_ip("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn identity_ids_are_stable() {
        let table = IdentityTable::new(10);
        let a = ClientIdentity {
            app_name: Some(Arc::from("a")),
            ..Default::default()
        };
        let b = ClientIdentity {
            app_name: Some(Arc::from("b")),
            ..Default::default()
        };
        let id_a = table.intern(&a);
        assert_eq!(table.intern(&a.clone()), id_a);
        assert_ne!(table.intern(&b), id_a);
        assert_eq!(table.get(id_a).as_deref(), Some(&a));
    }
}
