//! Starting the data path as `[proxy]` configures it: the configuration is
//! turned into the proxy's settings first (validated, TLS files read), so a
//! bad value fails the start naming its key, before anything is bound.
//! It owns no policy: the caller chooses the inspector (the session engine
//! through `EngineInspector`, or none) and the metrics registry.

use std::io;
use std::sync::Arc;

use sessionguard_proxy::{Inspector, Proxy, ProxyHandle};

use crate::config::ProxyConfig;
use crate::metrics::Metrics;

/// `Proxy::start` with the settings `config` resolves to, recording into
/// `metrics`. A configuration error is `InvalidInput`, its message naming
/// the key (`proxy.tls.cert_file: ...`).
pub async fn start_proxy<I: Inspector>(
    config: &ProxyConfig,
    inspector: Arc<I>,
    metrics: &Metrics,
) -> io::Result<ProxyHandle> {
    let settings = config
        .settings()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Proxy::start(settings, inspector, metrics.proxy().clone()).await
}
