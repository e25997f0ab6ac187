//! The upstream side of a connection: parsing the MongoDB connection string
//! given as `--upstream`, and dialing the upstream member with a timeout.
//! It owns nothing about frames or sessions, and it must never log
//! credentials from the connection string (the password is redacted in
//! `Debug`). It knows nothing of TLS: `tls::connect` dials through here
//! and adds the handshake when the connection string asks for it. `dial`
//! runs on tokio (the readiness probe); `dial_data` on a data thread.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// The port a host without an explicit port listens on.
pub(crate) const DEFAULT_MONGODB_PORT: u16 = 27017;

/// A `mongodb://` connection string, parsed far enough for the proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// Every host of the seed list, in order.
    pub hosts: Vec<HostPort>,
    /// The user name from the user info, percent-decoded.
    pub username: Option<String>,
    password: Option<String>,
    /// The database in the path (`/db`), if any.
    pub default_database: Option<String>,
    /// The options after `?` in order, keys as written, values
    /// percent-decoded (kept for later: tls, replicaSet, compressors...).
    pub options: Vec<(String, String)>,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("hosts", &self.hosts)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("default_database", &self.default_database)
            .field("options", &self.options)
            .finish()
    }
}

/// One host of the seed list. `host` carries IPv6 literals without brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl ConnectionString {
    /// Parses a standard MongoDB connection string. `mongodb+srv://` and Unix
    /// domain sockets are refused with a clear message rather than misread.
    pub fn parse(uri: &str) -> Result<ConnectionString, String> {
        let rest = if let Some(rest) = strip_prefix_ignore_case(uri, "mongodb://") {
            rest
        } else if strip_prefix_ignore_case(uri, "mongodb+srv://").is_some() {
            return Err("mongodb+srv:// connection strings are not supported yet; \
                        list the hosts with mongodb://host1,host2/..."
                .to_string());
        } else {
            return Err("must start with mongodb://".to_string());
        };

        // The host list ends at the first '/' or, without a path, at '?'.
        // Reserved characters inside user info must be percent-encoded
        // (connection string spec), so the last '@' before that point is the
        // user info separator.
        let authority_end = rest
            .find('/')
            .or_else(|| rest.find('?'))
            .unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host_list) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };

        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = match info.find(':') {
                    Some(colon) => (&info[..colon], Some(&info[colon + 1..])),
                    None => (info, None),
                };
                if user.is_empty() {
                    return Err("user info is present but the user name is empty".to_string());
                }
                let user = percent_decode(user).map_err(|e| format!("user name: {e}"))?;
                let pass = pass
                    .map(percent_decode)
                    .transpose()
                    .map_err(|e| format!("password: {e}"))?;
                (Some(user), pass)
            }
        };

        if host_list.is_empty() {
            return Err("no host given".to_string());
        }
        let hosts = host_list
            .split(',')
            .map(parse_host_port)
            .collect::<Result<Vec<_>, _>>()?;

        let (path, query) = match tail.find('?') {
            Some(q) => (&tail[..q], Some(&tail[q + 1..])),
            None => (tail, None),
        };
        let default_database = match path.strip_prefix('/') {
            Some("") | None => None,
            Some(db) => Some(percent_decode(db).map_err(|e| format!("database name: {e}"))?),
        };

        let mut options = Vec::new();
        if let Some(query) = query {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let Some((key, value)) = pair.split_once('=') else {
                    return Err(format!("option `{pair}` has no value (expected key=value)"));
                };
                if key.is_empty() {
                    return Err(format!("option `{pair}` has an empty name"));
                }
                let value = percent_decode(value).map_err(|e| format!("option `{key}`: {e}"))?;
                options.push((key.to_string(), value));
            }
        }

        Ok(ConnectionString {
            hosts,
            username,
            password,
            default_database,
            options,
        })
    }

    /// The value of an option; names are case-insensitive as in the spec.
    /// When an option is repeated the last value wins.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The host the proxy connects to today: the first of the seed list.
    pub fn primary_target(&self) -> &HostPort {
        &self.hosts[0]
    }

    /// Whether a password was given (the value itself is never exposed to logs).
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn parse_host_port(raw: &str) -> Result<HostPort, String> {
    if raw.is_empty() {
        return Err("empty host in the host list".to_string());
    }
    if raw.contains('%') || raw.ends_with(".sock") {
        return Err(format!(
            "host `{raw}`: Unix domain sockets are not supported; use host:port"
        ));
    }
    let (host, port) = if let Some(after_bracket) = raw.strip_prefix('[') {
        let close = after_bracket
            .find(']')
            .ok_or_else(|| format!("host `{raw}`: IPv6 literal is missing its closing `]`"))?;
        let host = &after_bracket[..close];
        let after = &after_bracket[close + 1..];
        let port =
            match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    format!("host `{raw}`: expected `:port` after the IPv6 literal")
                })?),
            };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("host `{raw}`: `{host}` is not an IPv6 address"));
        }
        (host, port)
    } else {
        match raw.matches(':').count() {
            0 => (raw, None),
            1 => {
                let (host, port) = raw.split_once(':').expect("one colon");
                (host, Some(port))
            }
            _ => {
                return Err(format!(
                    "host `{raw}`: IPv6 addresses must be written in brackets, e.g. [::1]:27017"
                ))
            }
        }
    };
    if host.is_empty() {
        return Err(format!("host `{raw}`: empty host name"));
    }
    let port = match port {
        None => DEFAULT_MONGODB_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "host `{raw}`: port `{p}` is not a number between 1 and 65535"
                ))
            }
            Ok(port) => port,
        },
    };
    Ok(HostPort {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding is not valid UTF-8".to_string())
}

/// Why the upstream could not be reached. `unreachable` explains each one
/// to the client, with a fix.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("upstream {target}: cannot resolve the host name: {source}")]
    Resolve {
        target: HostPort,
        #[source]
        source: io::Error,
    },
    #[error("upstream {target} did not accept the connection within {timeout:?}")]
    Timeout { target: HostPort, timeout: Duration },
    #[error("upstream {target} unreachable: {source}")]
    Io {
        target: HostPort,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with upstream {target} did not finish within {timeout:?}")]
    TlsTimeout { target: HostPort, timeout: Duration },
    #[error("TLS handshake with upstream {target} failed: {source}")]
    Tls {
        target: HostPort,
        #[source]
        source: io::Error,
    },
}

impl DialError {
    /// The upstream that could not be reached.
    pub fn target(&self) -> &HostPort {
        match self {
            DialError::Resolve { target, .. }
            | DialError::Timeout { target, .. }
            | DialError::Io { target, .. }
            | DialError::TlsTimeout { target, .. }
            | DialError::Tls { target, .. } => target,
        }
    }

    /// The TCP connection was made and the TLS handshake failed: the
    /// upstream is reachable (the readiness probe, a plain TCP connect,
    /// would say so at its next round).
    pub fn reached_the_upstream(&self) -> bool {
        matches!(self, DialError::TlsTimeout { .. } | DialError::Tls { .. })
    }
}

/// Opens a TCP connection to `target` within `timeout` (no TLS: the
/// readiness probe only asks whether the member accepts connections). Name
/// resolution counts against the same timeout, so a black-holed DNS server
/// cannot stall a client; it is done apart from connecting so that a name
/// that does not resolve is told apart from an address that refuses.
pub async fn dial(target: &HostPort, timeout: Duration) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, resolve_and_connect(target)).await {
        Err(_) => Err(DialError::Timeout {
            target: target.clone(),
            timeout,
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(stream)) => {
            // Small request/reply messages must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// Each resolved address in turn, as `TcpStream::connect` does; the last
/// address's error when none accepts.
async fn resolve_and_connect(target: &HostPort) -> Result<TcpStream, DialError> {
    let addresses = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|source| DialError::Resolve {
            target: target.clone(),
            source,
        })?;
    let mut last_error = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(none_accepted(target, last_error))
}

/// Name resolution for a data thread, which must never block on DNS: a
/// name is looked up elsewhere and the connection's task is woken when the
/// answer is in (see `listener`). IP literals never get here.
pub(crate) trait Resolve {
    fn resolve<'a>(
        &'a self,
        target: &'a HostPort,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Vec<SocketAddr>>> + 'a>>;
}

/// `dial` on a data thread (monoio): the same errors, timeout and nodelay,
/// with names resolved through `resolver` (IP literals directly).
pub(crate) async fn dial_data(
    target: &HostPort,
    timeout: Duration,
    resolver: &dyn Resolve,
) -> Result<monoio::net::TcpStream, DialError> {
    let connect = async {
        let addresses = match target.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => resolver
                .resolve(target)
                .await
                .map_err(|source| DialError::Resolve {
                    target: target.clone(),
                    source,
                })?,
        };
        let mut last_error = None;
        for address in addresses {
            match monoio::net::TcpStream::connect_addr(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(none_accepted(target, last_error))
    };
    match monoio::time::timeout(timeout, Box::pin(connect)).await {
        Err(_) => Err(DialError::Timeout {
            target: target.clone(),
            timeout,
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// No address accepted: the last one's error, or none resolved at all.
fn none_accepted(target: &HostPort, last_error: Option<io::Error>) -> DialError {
    match last_error {
        Some(source) => DialError::Io {
            target: target.clone(),
            source,
        },
        None => DialError::Resolve {
            target: target.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "the name has no address"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn single_host_without_port_gets_default_port() {
        let cs = ConnectionString::parse("mongodb://db.example.com").unwrap();
        assert_eq!(cs.hosts, vec![hp("db.example.com", 27017)]);
        assert_eq!(cs.default_database, None);
        assert!(cs.options.is_empty());
    }

    #[test]
    fn several_hosts_path_and_options() {
        let cs = ConnectionString::parse(
            "mongodb://a:27017,b:27018,[::1]:27019/app?replicaSet=rs0&tls=true&compressors=zstd,snappy",
        )
        .unwrap();
        assert_eq!(
            cs.hosts,
            vec![hp("a", 27017), hp("b", 27018), hp("::1", 27019)]
        );
        assert_eq!(cs.primary_target(), &hp("a", 27017));
        assert_eq!(cs.default_database.as_deref(), Some("app"));
        assert_eq!(cs.option("REPLICASET"), Some("rs0"));
        assert_eq!(cs.option("compressors"), Some("zstd,snappy"));
    }

    #[test]
    fn ipv6_without_port_and_display_round_trip() {
        let cs = ConnectionString::parse("mongodb://[fe80::1]/").unwrap();
        assert_eq!(cs.hosts, vec![hp("fe80::1", 27017)]);
        assert_eq!(cs.hosts[0].to_string(), "[fe80::1]:27017");
        assert_eq!(hp("a", 1).to_string(), "a:1");
    }

    #[test]
    fn credentials_are_decoded_and_password_redacted_in_debug() {
        let cs = ConnectionString::parse("mongodb://us%40er:p%3Ass%2Fw@h1:1000/?authSource=admin")
            .unwrap();
        assert_eq!(cs.username.as_deref(), Some("us@er"));
        assert!(cs.has_password());
        assert_eq!(cs.hosts, vec![hp("h1", 1000)]);
        let debug = format!("{cs:?}");
        assert!(!debug.contains("p:ss"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn query_without_path_ends_the_host_list() {
        let cs = ConnectionString::parse("mongodb://h?directConnection=true").unwrap();
        assert_eq!(cs.hosts, vec![hp("h", 27017)]);
        assert_eq!(cs.option("directconnection"), Some("true"));
    }

    #[test]
    fn srv_is_refused_with_a_clear_message() {
        let err = ConnectionString::parse("mongodb+srv://cluster0.example.net").unwrap_err();
        assert!(err.contains("not supported yet"), "{err}");
    }

    #[test]
    fn malformed_strings_are_refused_with_reasons() {
        let cases = [
            ("http://h", "must start with mongodb://"),
            ("mongodb://", "no host"),
            ("mongodb:///db", "no host"),
            ("mongodb://h:0", "between 1 and 65535"),
            ("mongodb://h:70000", "between 1 and 65535"),
            ("mongodb://h:abc", "between 1 and 65535"),
            ("mongodb://::1", "brackets"),
            ("mongodb://[::1", "closing"),
            ("mongodb://[::1]x", "`:port`"),
            ("mongodb://[nope]:1", "not an IPv6"),
            ("mongodb://a,,b", "empty host"),
            ("mongodb://:27017", "empty host name"),
            ("mongodb://%2Ftmp%2Fm.sock", "Unix domain"),
            ("mongodb://h/?tls", "no value"),
            ("mongodb://h/?=x", "empty name"),
            ("mongodb://:pw@h", "user name is empty"),
            ("mongodb://u:%zz@h", "percent"),
        ];
        for (uri, expected) in cases {
            let err = ConnectionString::parse(uri).expect_err(uri);
            assert!(err.contains(expected), "{uri}: {err}");
        }
    }

    #[tokio::test]
    async fn dial_reports_refused_connection() {
        // Bind then drop to get a local port with nothing listening.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = dial(&hp("127.0.0.1", port), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Io { .. }), "{err}");
        assert!(err.to_string().contains("unreachable"), "{err}");
        assert!(!err.reached_the_upstream());
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_told_apart_from_a_refusal() {
        // `.invalid` never resolves (RFC 6761).
        let err = dial(&hp("nonexistent.invalid", 27017), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Resolve { .. }), "{err}");
        assert!(!err.reached_the_upstream());
    }
}
