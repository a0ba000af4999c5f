//! The connection path, in the order a connection meets it: [`listener`] accepts,
//! and `connection::serve` takes it through its phases, one module each:
//!
//! 1. `negotiate`: direct TLS or SSLRequest, GSSENCRequest, CancelRequest (handed to
//!    [`cancel`]), the StartupMessage and the protocol version;
//! 2. [`auth`]: the client proves who it is, against the role's stored password;
//! 3. [`route`]: the names in the packet become a source and a branch;
//! 4. `authorize`: the source's policies (replication, role lists);
//! 5. `connect`: the registry leases the branch, [`backend`] logs in to its server;
//! 6. [`relay`]: bytes are pumped until either side closes; a client that ends
//!    cleanly leaves its server session to the [`pool`] for the next client.
//!
//! [`Proxy`] is what every connection shares.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;

use crate::auth::Credentials;
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
use crate::config::{AuthMethod, Config, ProxyConfig, TlsConfig, TlsMode};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

pub mod auth;
mod authorize;
pub mod backend;
pub mod cancel;
mod connect;
mod connection;
mod limits;
pub mod listener;
mod negotiate;
pub mod pool;
pub mod protocol;
mod record;
pub mod relay;
pub mod route;
mod spare_sessions;
pub mod tls;
pub mod track;

pub use negotiate::ClientStream;

/// The authentication method of each source, as [`Config::auth_method`] decides it.
///
/// A name that is no source must not be told apart by its method before the
/// client authenticates: it gets the method of a configured source, picked by a
/// keyed hash of the name (stable for that name, across restarts too), as if it
/// were one. `trust` sources are left out of the pick: they hide nothing.
pub struct AuthMethods {
    by_source: HashMap<String, AuthMethod>,
    /// The methods of the sources that authenticate, in source-name order.
    pick_from: Vec<AuthMethod>,
    /// `auth.method`: for names that are no source when every source is `trust`.
    default: AuthMethod,
    key: ring::hmac::Key,
}

impl AuthMethods {
    /// `key` keys the pick for unknown names (the mock verifiers' key).
    pub fn from_config(cfg: &Config, key: &[u8; 32]) -> Self {
        let by_source: HashMap<String, AuthMethod> = cfg
            .sources
            .keys()
            .map(|name| (name.to_string(), cfg.auth_method(Some(name.as_str()))))
            .collect();
        let mut named: Vec<(&String, &AuthMethod)> = by_source.iter().collect();
        named.sort_by_key(|(name, _)| *name);
        let pick_from = named
            .into_iter()
            .map(|(_, m)| *m)
            .filter(|m| *m != AuthMethod::Trust)
            .collect();
        Self {
            by_source,
            pick_from,
            default: cfg.auth_method(None),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        }
    }

    /// The method for a source name taken from a startup packet (maybe no source).
    fn for_name(&self, source: &str) -> AuthMethod {
        if let Some(m) = self.by_source.get(source) {
            return *m;
        }
        if self.pick_from.is_empty() {
            return self.default;
        }
        let tag = ring::hmac::sign(&self.key, source.as_bytes());
        let n = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
        self.pick_from[(n % self.pick_from.len() as u64) as usize]
    }
}

/// Who may connect, and how the proxy reaches the sources' servers.
pub struct Access {
    credentials: Arc<Credentials>,
    methods: AuthMethods,
    /// `server_tls` of each source, by name.
    upstream: HashMap<String, Upstream>,
}

impl Access {
    pub fn new(
        credentials: Arc<Credentials>,
        methods: AuthMethods,
        upstream: HashMap<String, Upstream>,
    ) -> Self {
        Self {
            credentials,
            methods,
            upstream,
        }
    }

    /// The TLS settings towards a source's server.
    fn upstream(&self, source: &str) -> Option<Arc<rustls::ClientConfig>> {
        self.upstream.get(source).and_then(|u| u.config.clone())
    }
}

/// TLS towards clients.
pub struct ClientTls {
    /// The loaded certificate; swappable so it can be reloaded without a restart.
    current: RwLock<Option<Arc<tls::Tls>>>,
    /// `tls.mode = "require"`: plaintext sessions are refused.
    required: bool,
    /// `tls.sni_suffix`: TLS server names under it name the branch.
    sni_suffix: Option<String>,
}

impl ClientTls {
    pub fn new(loaded: Option<tls::Tls>, cfg: &TlsConfig) -> Self {
        Self {
            current: RwLock::new(loaded.map(Arc::new)),
            required: cfg.mode == TlsMode::Require,
            sni_suffix: cfg.sni_suffix.clone(),
        }
    }

    /// The certificate new sessions get.
    fn current(&self) -> Option<Arc<tls::Tls>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Everything a connection needs, shared by all of them.
pub struct Proxy {
    /// `[proxy]`: timeouts and routing.
    config: ProxyConfig,
    /// The control plane's branch state: routing looks sources up, connections
    /// lease branches.
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    access: Access,
    tls: ClientTls,
    limits: limits::Limits,
    /// Live cancel keys.
    cancels: Arc<cancel::CancelMap>,
    relays: relay::RelayPool,
    counters: relay::Counters,
    /// Server sessions kept between clients.
    pool: Arc<pool::Pool>,
}

impl Proxy {
    /// Starts the relay threads; connections come from [`listener::run`].
    pub fn new(
        config: ProxyConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tls: ClientTls,
        access: Access,
    ) -> std::io::Result<Self> {
        let relays = relay::RelayPool::start(config.relay_threads)?;
        let pool = Arc::new(pool::Pool::new(
            config.max_idle_per_branch,
            config.server_idle_timeout,
            &metrics,
        ));
        // A branch's kept sessions close before its server stops or its clone goes.
        let drain = pool.clone();
        registry.on_drain(move |id| {
            drain.drain(id);
        });
        let counters = relay::Counters {
            to_server: metrics.bytes_total.with_label_values(&["client_to_server"]),
            to_client: metrics.bytes_total.with_label_values(&["server_to_client"]),
        };
        Ok(Self {
            limits: limits::Limits {
                connections: Arc::new(Semaphore::new(config.max_connections)),
                unauthenticated: limits::Unauthenticated::new(
                    config.max_unauthenticated_per_address,
                    metrics.connections_unauthenticated.clone(),
                ),
                cancels: cancel::CancelLimit::new(config.cancel_rate),
            },
            config,
            registry,
            metrics,
            access,
            tls,
            cancels: Arc::new(cancel::CancelMap::default()),
            relays,
            counters,
            pool,
        })
    }

    /// The server sessions kept between clients (its sweeper runs in `app`).
    pub fn pool(&self) -> Arc<pool::Pool> {
        self.pool.clone()
    }

    /// Client connections open right now (in startup or relayed).
    pub fn open_connections(&self) -> usize {
        self.config.max_connections - self.limits.connections.available_permits()
    }

    /// Cancels the running statement of every open session (the end of the
    /// shutdown grace); returns how many cancels were delivered.
    pub async fn cancel_all(&self) -> usize {
        self.cancels.cancel_all().await
    }

    /// Re-reads the users file (on SIGHUP).
    pub fn reload_credentials(&self) {
        self.access.credentials.reload();
    }

    /// Serves new TLS sessions with `loaded`; open sessions keep theirs.
    pub fn replace_certificate(&self, loaded: tls::Tls) {
        *self.tls.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(loaded));
    }
}
