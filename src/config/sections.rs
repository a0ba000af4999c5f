//! The sections of the configuration that are not sources: the client listener, TLS,
//! authentication, the admin endpoint, the state directory, the embedded server and
//! the reaper. Each is a typed struct with a default for every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How the branch is found in the startup packet.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouteBy {
    /// `database = "<source><sep><branch>"`.
    #[default]
    Database,
    /// `user = "<user><sep><branch>"`, `database = "<source>"`.
    User,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// Which startup parameter carries the branch.
    pub route_by: RouteBy,
    /// Separates source (or user) from branch; the name is split at its last occurrence.
    /// `.` needs no escaping in any connection URL.
    pub separator: String,
    /// A client that has not finished its startup packet (and TLS handshake) by then
    /// is dropped, so silent sockets cannot pile up.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// How long a client waits for its branch to be created before it gets 57P03.
    /// Creation goes on in the background past this point.
    #[serde(with = "humantime_serde")]
    pub provision_timeout: Duration,
    /// Client connections accepted at once; further ones get 53300.
    pub max_connections: usize,
    /// Threads that run client connections, each from accept to close (startup,
    /// authentication relay, byte pump). 0 means half the CPU cores, at least one.
    pub relay_threads: usize,
    /// CancelRequests accepted per second from one client address (bursts of twice
    /// that); more are dropped, so cancel keys cannot be guessed at speed. 0: no limit.
    pub cancel_rate: u32,
    /// Connections from one client address that may be open without having
    /// finished authenticating; further ones get 53300, so silent sockets from one
    /// address cannot lock others out. 0: no limit.
    pub max_unauthenticated_per_address: usize,
    /// On SIGTERM/Ctrl-C, how long open connections may take to finish before the
    /// proxy exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A server session kept for reuse (see `server_reuse`) and not taken again
    /// within this time is closed.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Most server sessions kept for reuse per branch; 0 turns reuse off.
    pub max_idle_per_branch: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".parse().expect("valid default address"),
            route_by: RouteBy::Database,
            separator: ".".into(),
            startup_timeout: Duration::from_secs(10),
            provision_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            relay_threads: 0,
            cancel_rate: 10,
            max_unauthenticated_per_address: 64,
            shutdown_grace: Duration::from_secs(10),
            server_idle_timeout: Duration::from_secs(60),
            max_idle_per_branch: 16,
        }
    }
}

/// What the proxy demands of clients' TLS.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Answer every SSLRequest with `N`.
    Disable,
    /// Accept TLS when a client asks, plain otherwise (for a server, the same as
    /// `prefer`).
    Allow,
    /// Accept TLS when a client asks, plain otherwise.
    #[default]
    Prefer,
    /// Refuse clients that do not use TLS (28000).
    Require,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// What clients must do; TLS is offered only when `cert` and `key` are set.
    pub mode: TlsMode,
    /// PEM certificate chain presented to clients. Re-read on SIGHUP.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`. Re-read on SIGHUP.
    pub key: Option<PathBuf>,
    /// With `sni_suffix = "db.example.com"`, a TLS client that connects to host
    /// `pr-42.shop.db.example.com` reaches branch `pr-42` of source `shop`, whatever
    /// its database name says.
    pub sni_suffix: Option<String>,
}

impl TlsConfig {
    /// Whether clients are offered TLS.
    pub fn enabled(&self) -> bool {
        self.mode != TlsMode::Disable && self.cert.is_some() && self.key.is_some()
    }
}

/// How the proxy authenticates clients.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// The proxy checks nothing and relays the branch server's own authentication
    /// exchange. Anyone who can reach the proxy can make branches: local use only.
    #[serde(rename = "trust")]
    Trust,
    /// Cleartext password, checked by the proxy; only over TLS.
    #[serde(rename = "password")]
    Password,
    /// SCRAM-SHA-256, with SCRAM-SHA-256-PLUS (channel binding) over TLS.
    // Spelled out: kebab-case would make it "scram-sha256", which is not the
    // PostgreSQL name the documentation uses.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// PostgreSQL's `md5` method: an md5 challenge for roles whose stored password
    /// is an md5 hash, SCRAM for the others. md5 is deprecated; opt in per source
    /// for clusters upgraded from older releases.
    #[serde(rename = "md5")]
    Md5,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Password => "password",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
        }
    }
}

/// The default `auth.query`: verifier, LOGIN and expiry of one role.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolpassword, rolcanlogin, rolvaliduntil \
     FROM pg_catalog.pg_authid WHERE rolname = $1";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Method for every source that sets no `auth_method` of its own.
    pub method: AuthMethod,
    /// Looks up a role's stored password (`SCRAM-SHA-256$...` or `md5...`) on the
    /// source's server. `$1` is the role name. Optional second and third columns:
    /// whether the role may log in, and until when its password is valid. Runs on a
    /// small pool of dedicated connections with `search_path = pg_catalog`.
    pub query: String,
    /// Optional file of `"role" "verifier"` lines (PgBouncer's userlist format),
    /// consulted before `query`. Re-read on SIGHUP.
    pub users_file: Option<PathBuf>,
    /// Stored SCRAM verifiers with more PBKDF2 iterations than this are refused (the
    /// role fails like a wrong password, and the log says why): a role could
    /// otherwise make every login cost the proxy, or a client, hours of hashing.
    pub max_scram_iterations: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            method: AuthMethod::ScramSha256,
            query: DEFAULT_AUTH_QUERY.into(),
            users_file: None,
            max_scram_iterations: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint.
    pub listen: SocketAddr,
    /// Set to false to run without the HTTP endpoint.
    pub enabled: bool,
    /// File holding the bearer token every write (and, unless `public_read`, every
    /// read) must carry. Unset: `serve` makes one at `<state.dir>/admin.token`
    /// (mode 0600) and reuses it, and the CLI finds it there.
    pub token_file: Option<PathBuf>,
    /// Let reads (GET: metrics, health, lists) through without the token. Only on a
    /// loopback `listen`: a listener others can reach always needs the token.
    pub public_read: bool,
    /// Host names (or addresses) the API answers to besides loopback ones and the
    /// `listen` address, e.g. a container's service name. Other `Host` headers get
    /// 421, which is what defeats DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".parse().expect("valid default address"),
            enabled: true,
            token_file: None,
            public_read: false,
            allowed_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Directory for branch records and the embedded server; created if missing.
    /// Relative paths are resolved against the working directory.
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".offshoot"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Directory holding the PostgreSQL binaries (initdb, postgres, pg_ctl).
    /// Unset: `pg_config --bindir`, then PATH, then `/usr/lib/postgresql/*/bin`.
    pub bin_dir: Option<PathBuf>,
    /// Port of the embedded server. It listens only on a Unix socket in
    /// `<state.dir>/run`, so the port only names the socket file.
    pub port: u16,
    /// Superuser created by initdb; local connections use `trust`.
    pub user: String,
    /// Extra `postgres -c` settings for the embedded server.
    pub settings: BTreeMap<String, String>,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            bin_dir: None,
            port: 5432,
            user: "postgres".into(),
            settings: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReaperConfig {
    /// How often idle branches are looked for and activity is saved.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How often branch sizes are measured (for `size_bytes` and
    /// `max_total_size`); each measurement asks every branch's engine.
    #[serde(with = "humantime_serde")]
    pub size_interval: Duration,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            size_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RehearsalConfig {
    /// The one directory whose files a server-side rehearsal (`POST
    /// /api/v1/rehearsals`) may name in `sql_files` and `check_files`, as paths
    /// relative to it. Unset: such paths are refused and only inline SQL runs.
    pub sql_dir: Option<PathBuf>,
    /// Most server-side rehearsals running at once; more are refused (429).
    pub max_running: usize,
}

impl Default for RehearsalConfig {
    fn default() -> Self {
        Self {
            sql_dir: None,
            max_running: 2,
        }
    }
}
