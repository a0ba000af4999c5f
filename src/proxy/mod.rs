//! The connection path, in the order a connection meets it: [`listener`] accepts,
//! [`startup`] negotiates and routes ([`route`]), the registry supplies the branch,
//! [`backend`] opens the server session, and [`relay`] pumps bytes until the end.
//! [`cancel`] maps the proxy's cancel keys to server sessions.

use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;

use crate::branch::Registry;

/// Implements tokio's AsyncRead and AsyncWrite for an enum of streams by
/// forwarding to whichever variant it holds.
macro_rules! either_stream {
    ($ty:ident { $($v:ident),+ }) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$v(s) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}
use crate::config::ProxyConfig;
use crate::metrics::Metrics;

pub mod auth;
pub mod backend;
pub mod cancel;
pub mod listener;
pub mod protocol;
pub mod relay;
pub mod route;
pub mod startup;
pub mod tls;

/// Who may connect, and how the proxy reaches the sources' servers.
pub struct Access {
    pub credentials: Arc<crate::auth::Credentials>,
    /// `auth.method`.
    pub method: crate::config::AuthMethod,
    /// `server_tls` of each source, by name.
    pub upstream: std::collections::HashMap<String, crate::upstream::Upstream>,
}

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    pub config: ProxyConfig,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<cancel::CancelMap>,
    /// `proxy.cancel_rate`: CancelRequests per second per client address.
    pub cancel_limit: cancel::CancelLimit,
    /// Swappable so certificates can be reloaded without a restart.
    pub tls: RwLock<Option<Arc<tls::Tls>>>,
    /// Roles' stored passwords, for sources that authenticate at the proxy.
    pub credentials: Arc<crate::auth::Credentials>,
    /// `auth.method`: for sources without their own, and names that are no source.
    pub auth_method: crate::config::AuthMethod,
    /// TLS towards each source's server (`server_tls`), by source name.
    pub upstream: std::collections::HashMap<String, crate::upstream::Upstream>,
    pub relays: relay::RelayPool,
    pub counters: relay::Counters,
    /// One permit per open client connection (`proxy.max_connections`).
    pub conn_limit: Arc<Semaphore>,
    /// `tls.mode = "require"`: plaintext sessions are refused.
    pub tls_required: bool,
    /// `tls.sni_suffix`: TLS server names under it name the branch.
    pub sni_suffix: Option<String>,
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tls: Option<tls::Tls>,
        tls_config: &crate::config::TlsConfig,
        access: Access,
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
            cancel_limit: cancel::CancelLimit::new(config.cancel_rate),
            config,
            registry,
            metrics,
            cancels: Arc::new(cancel::CancelMap::default()),
            tls: RwLock::new(tls.map(Arc::new)),
            credentials: access.credentials,
            auth_method: access.method,
            upstream: access.upstream,
            relays: relay::RelayPool::start(threads)?,
            counters,
            tls_required: tls_config.mode == crate::config::TlsMode::Require,
            sni_suffix: tls_config.sni_suffix.clone(),
        })
    }

    /// The authentication method for a source name (which may be no source).
    pub fn auth_method_for(&self, source: &str) -> crate::config::AuthMethod {
        self.registry
            .source(source)
            .and_then(|s| s.config.auth_method)
            .unwrap_or(self.auth_method)
    }

    /// Client connections open right now (in startup or relayed).
    pub fn open_connections(&self) -> usize {
        self.config.max_connections - self.conn_limit.available_permits()
    }
}
