//! The connection path, in the order a connection meets it: [`listener`] accepts,
//! [`startup`] negotiates and routes ([`route`]), the registry supplies the branch,
//! [`backend`] opens the server session, and [`relay`] pumps bytes until the end.
//! [`cancel`] maps the proxy's cancel keys to server sessions.

use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::branch::Registry;
use crate::config::ProxyConfig;
use crate::metrics::Metrics;

pub mod backend;
pub mod cancel;
pub mod listener;
pub mod protocol;
pub mod relay;
pub mod route;
pub mod startup;
pub mod tls;

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub config: ProxyConfig,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<cancel::CancelMap>,
    /// Swappable so certificates can be reloaded without a restart.
    pub tls: RwLock<Option<TlsAcceptor>>,
    pub relays: relay::RelayPool,
    pub counters: relay::Counters,
    /// One permit per open client connection (`proxy.max_connections`).
    pub conn_limit: Arc<Semaphore>,
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let threads = match config.relay_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let counters = relay::Counters {
            to_server: metrics.bytes_total.with_label_values(&["client_to_server"]),
            to_client: metrics.bytes_total.with_label_values(&["server_to_client"]),
        };
        Ok(Self {
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            config,
            registry,
            metrics,
            cancels: Arc::new(cancel::CancelMap::default()),
            tls: RwLock::new(tls),
            relays: relay::RelayPool::start(threads)?,
            counters,
        })
    }

    /// Client connections open right now (in startup or relayed).
    pub fn open_connections(&self) -> usize {
        self.config.max_connections - self.conn_limit.available_permits()
    }
}
