//! Which local process opened a client connection (Linux, `exec` mode):
//! from the connection's two addresses, the socket's inode in
//! `/proc/net/tcp` (or `tcp6`), then the process holding `socket:[inode]`
//! among `/proc/*/fd`, with its shortened command line and its parent
//! chain (`/proc/PID/stat`), so a connection opened by a child of a test
//! process can be matched with that test process's marks.
//!
//! It owns the `/proc` parsing and the [`ProcessTable`] of connection id ->
//! [`Owner`]. The lookup walks every process's descriptors, so it must never
//! run on the data path: `EngineInspector::on_connect` hands it to the
//! blocking pool at once (before the client can go away) and the proxy goes
//! on. Where the owner cannot be found it says why ([`Owner::Unknown`]); it
//! never guesses. Command-line arguments that may carry secrets (URLs,
//! `key=value` with a password-like key) are not kept.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Connections whose owner is kept at most; later ones are `Unknown`.
pub(crate) const MAX_CONNECTIONS: usize = 200_000;
/// Longest command line kept, in characters.
const MAX_CMDLINE: usize = 160;
/// Parents followed at most (a loop in a corrupt table must end).
const MAX_PARENTS: usize = 32;
/// Recent owners tried first by the next lookup.
const HINTS: usize = 16;

/// A process that owns a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessInfo {
    pub pid: u32,
    /// Shortened: program and arguments, long paths cut to their last parts,
    /// arguments that may hold secrets left out.
    pub cmdline: String,
    /// Parent, grandparent, ... up to (not including) pid 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<u32>,
}

/// Who opened a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Owner {
    Known(ProcessInfo),
    /// Why it is not known: `another host (10.0.0.5)`, `no permission ...`.
    Unknown(String),
}

impl Owner {
    /// `pid 4242 (node .../jest-worker/build/processChild.js)`, or
    /// `unknown: <reason>`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Owner::Known(p) => format!("pid {} ({})", p.pid, p.cmdline),
            Owner::Unknown(why) => format!("unknown: {why}"),
        }
    }
}

/// Connection id -> owner, filled by lookups on the blocking pool.
#[derive(Debug, Default)]
pub(crate) struct ProcessTable {
    owners: Mutex<HashMap<u64, Owner>>,
    /// The latest owners found, most recent first: a test worker opens a
    /// pool of connections, so the next one is most likely one of its own,
    /// and checking those few processes first keeps the lookup short.
    hints: Mutex<Vec<u32>>,
    /// Lookups started and not finished.
    pending: AtomicUsize,
    finished: tokio::sync::Notify,
}

/// One lookup in progress: [`ProcessTable::lookups_done`] waits for it.
#[derive(Debug)]
pub(crate) struct LookupGuard(Arc<ProcessTable>);

impl Drop for LookupGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.finished.notify_waiters();
    }
}

impl ProcessTable {
    /// Counts a lookup in progress until the guard is dropped.
    pub(crate) fn start_lookup(self: &Arc<Self>) -> LookupGuard {
        self.pending.fetch_add(1, Ordering::AcqRel);
        LookupGuard(self.clone())
    }

    /// Resolves once no lookup is in progress.
    pub(crate) async fn lookups_done(&self) {
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            finished.await;
        }
    }

    /// Looks up the owner of connection `conn` (see [`lookup`]) and keeps it.
    pub(crate) fn look_up(&self, conn: u64, client: SocketAddr, server: SocketAddr) {
        let hints = self.hints.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let owner = lookup(client, server, &hints);
        if let Owner::Known(info) = &owner {
            let mut hints = self.hints.lock().unwrap_or_else(|e| e.into_inner());
            hints.retain(|pid| *pid != info.pid);
            hints.insert(0, info.pid);
            hints.truncate(HINTS);
        }
        self.insert(conn, owner);
    }

    pub(crate) fn insert(&self, conn: u64, owner: Owner) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.len() < MAX_CONNECTIONS {
            owners.insert(conn, owner);
        }
    }

    pub(crate) fn snapshot(&self) -> HashMap<u64, Owner> {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The process that owns the client end of a connection: `client` is the
/// client's address as the proxy sees it (its peer), `server` the proxy's
/// address it connected to. `hints`: pids to check first.
pub(crate) fn lookup(client: SocketAddr, server: SocketAddr, hints: &[u32]) -> Owner {
    lookup_in(Path::new("/proc"), client, server, hints)
}

/// [`lookup`] against another `/proc` root.
fn lookup_in(proc: &Path, client: SocketAddr, server: SocketAddr, hints: &[u32]) -> Owner {
    if !cfg!(target_os = "linux") {
        return Owner::Unknown("process attribution needs Linux /proc".to_string());
    }
    if !is_local(client.ip(), server.ip()) {
        return Owner::Unknown(format!("connection from another host ({})", client.ip()));
    }
    let mut inode = None;
    for table in ["net/tcp", "net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(proc.join(table)) {
            inode = find_inode(&text, client, server);
            if inode.is_some() {
                break;
            }
        }
    }
    let Some(inode) = inode else {
        return Owner::Unknown(
            "socket not in /proc/net/tcp (the connection closed before the lookup)".to_string(),
        );
    };
    match socket_owner(proc, inode, hints) {
        Ok(pid) => Owner::Known(ProcessInfo {
            pid,
            cmdline: std::fs::read(proc.join(pid.to_string()).join("cmdline"))
                .map(|raw| short_cmdline(&raw))
                .unwrap_or_default(),
            parents: parents(proc, pid),
        }),
        Err(why) => Owner::Unknown(why),
    }
}

/// Same host: loopback, or the proxy's own address.
fn is_local(client: IpAddr, server: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (client, server) = (v4(client), v4(server));
    client.is_loopback() || client == server
}

/// The inode of the socket whose local end is `client` and remote end is
/// `server`, in the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub(crate) fn find_inode(table: &str, client: SocketAddr, server: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        let same = |text: &str, want: SocketAddr| {
            parse_hex_addr(text).is_some_and(|addr| same_endpoint(addr, want))
        };
        (same(local, client) && same(remote, server))
            .then(|| inode.parse::<u64>().ok())
            .flatten()
            .filter(|inode| *inode != 0)
    })
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:D431` (IPv4) or 32 hex digits `:PORT` (IPv6): each 32-bit
/// word of the address in the kernel's (host, here little-endian) order,
/// the port in plain hex.
pub(crate) fn parse_hex_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each word's value as it sits in memory.
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The pid whose descriptors hold `socket:[inode]`. Newest processes
/// first (a test worker is younger than most of the machine), stopping at
/// the first: the scan must end before the client closes the connection,
/// and a socket inherited across fork, held by several, is rare.
fn socket_owner(proc: &Path, inode: u64, hints: &[u32]) -> Result<u32, String> {
    let target = format!("socket:[{inode}]");
    let mut denied = 0usize;
    let holds = |pid: u32| -> Result<bool, std::io::Error> {
        Ok(std::fs::read_dir(proc.join(pid.to_string()).join("fd"))?
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            }))
    };
    if let Some(pid) = hints
        .iter()
        .copied()
        .find(|pid| holds(*pid).unwrap_or(false))
    {
        return Ok(pid);
    }
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .map_err(|e| format!("cannot read /proc: {e}"))?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !hints.contains(pid))
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    for pid in pids {
        match holds(pid) {
            Ok(true) => return Ok(pid),
            Ok(false) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => denied += 1,
            Err(_) => {} // exited meanwhile
        }
    }
    if denied > 0 {
        Err(format!(
            "no permission to read the descriptors of {denied} other process{} (another user's?)",
            if denied == 1 { "" } else { "es" }
        ))
    } else {
        Err(
            "no process held the socket any more: the connection closed before the lookup ended"
                .to_string(),
        )
    }
}

/// Parent pids from `/proc/PID/stat`, nearest first, stopping before pid 1.
fn parents(proc: &Path, pid: u32) -> Vec<u32> {
    let mut chain = Vec::new();
    let mut current = pid;
    while chain.len() < MAX_PARENTS {
        let Some(parent) = std::fs::read_to_string(proc.join(current.to_string()).join("stat"))
            .ok()
            .and_then(|stat| parent_of(&stat))
        else {
            break;
        };
        if parent <= 1 || chain.contains(&parent) {
            break;
        }
        chain.push(parent);
        current = parent;
    }
    chain
}

/// The ppid field of a `/proc/PID/stat` line: the comm field is in
/// parentheses and may itself hold spaces and parentheses, so count from
/// the last `)`.
pub(crate) fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `node .../jest-worker/build/processChild.js`: NUL-separated arguments
/// joined by spaces, the program by its name, paths cut to their last
/// three parts, arguments that may
/// hold secrets replaced by `…`, the whole cut at [`MAX_CMDLINE`].
pub(crate) fn short_cmdline(raw: &[u8]) -> String {
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .enumerate()
        .map(|(index, arg)| {
            let arg = String::from_utf8_lossy(arg);
            if index == 0 {
                // The program: its name says enough (`node`, `python3`).
                arg.rsplit('/').next().unwrap_or(&arg).to_string()
            } else {
                short_arg(&arg)
            }
        })
        .collect();
    let mut line = args.join(" ");
    if line.chars().count() > MAX_CMDLINE {
        line = line.chars().take(MAX_CMDLINE - 1).collect();
        line.push('…');
    }
    line
}

fn short_arg(arg: &str) -> String {
    let lower = arg.to_ascii_lowercase();
    let secret_key = ["pass", "secret", "token", "key", "auth", "cred"];
    if lower.contains("://")
        || (lower.contains('=')
            && secret_key
                .iter()
                .any(|k| lower.split('=').next().is_some_and(|key| key.contains(k))))
    {
        return "…".to_string();
    }
    if arg.starts_with('/') {
        let parts: Vec<&str> = arg.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() > 3 {
            return format!(".../{}", parts[parts.len() - 3..].join("/"));
        }
    }
    arg.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_addresses_as_the_kernel_writes_them() {
        assert_eq!(
            parse_hex_addr("0100007F:D431"),
            Some("127.0.0.1:54321".parse().unwrap())
        );
        assert_eq!(
            parse_hex_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_hex_addr("0000000000000000FFFF00000100007F:1F90"),
            Some("[::ffff:127.0.0.1]:8080".parse().unwrap())
        );
        assert_eq!(parse_hex_addr("zz:1"), None);
        assert_eq!(parse_hex_addr("0100007F"), None);
    }

    #[test]
    fn finds_the_client_end_not_the_server_end() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 222 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 333 1 0000000000000000 20 4 30 10 -1
";
        let client = "127.0.0.1:54321".parse().unwrap();
        let server = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(find_inode(table, client, server), Some(333));
        assert_eq!(find_inode(table, server, client), Some(222));
        assert_eq!(
            find_inode(table, "127.0.0.1:1".parse().unwrap(), server),
            None
        );
    }

    #[test]
    fn ppid_after_a_comm_with_spaces_and_parentheses() {
        assert_eq!(
            parent_of("4242 (node (jest) worker) S 4200 4242 4200 0 -1 4194304"),
            Some(4200)
        );
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn command_lines_are_short_and_keep_no_secrets() {
        let raw = b"/usr/local/bin/node\0/home/ci/app/node_modules/jest-worker/build/processChild.js\0--uri=mongodb://u:p@h\0API_TOKEN=abc\0-x\0";
        assert_eq!(
            short_cmdline(raw),
            "node .../jest-worker/build/processChild.js … … -x"
        );
        assert!(short_cmdline(&[b'a'; 400]).chars().count() <= MAX_CMDLINE);
    }

    #[test]
    fn other_hosts_are_unknown_never_guessed() {
        let owner = lookup(
            "10.1.2.3:5000".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
            &[],
        );
        assert_eq!(
            owner,
            Owner::Unknown("connection from another host (10.1.2.3)".to_string())
        );
        assert_eq!(
            owner.describe(),
            "unknown: connection from another host (10.1.2.3)"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn finds_this_process_as_the_owner_of_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server_end, peer) = listener.accept().unwrap();
        let owner = lookup(peer, listener.local_addr().unwrap(), &[]);
        let Owner::Known(info) = owner else {
            panic!("{owner:?}")
        };
        assert_eq!(info.pid, std::process::id());
        assert!(!info.cmdline.is_empty());
        assert_eq!(
            info.parents.first().copied(),
            parent_of(&std::fs::read_to_string("/proc/self/stat").unwrap())
                .filter(|ppid| *ppid > 1)
        );
        // Hints are tried first, and a wrong one does not hide the owner.
        let hinted = lookup(
            peer,
            listener.local_addr().unwrap(),
            &[1, std::process::id()],
        );
        assert!(
            matches!(&hinted, Owner::Known(i) if i.pid == std::process::id()),
            "{hinted:?}"
        );
        let table = ProcessTable::default();
        table.look_up(7, peer, listener.local_addr().unwrap());
        assert_eq!(*table.hints.lock().unwrap(), [std::process::id()]);
        assert!(matches!(table.snapshot().get(&7), Some(Owner::Known(_))));
        // Gone: closed sockets leave the table; say so.
        drop(client);
        drop(_server_end);
        let closed = lookup(peer, listener.local_addr().unwrap(), &[]);
        assert!(
            matches!(&closed, Owner::Unknown(why) if why.contains("socket not in")),
            "{closed:?}"
        );
    }
}
