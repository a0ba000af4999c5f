//! Typed configuration: a TOML file plus `OFFSHOOT__SECTION__KEY` environment overrides.
//!
//! This is the only module that reads configuration files or the environment. Every
//! field has a default, so an empty file is a valid configuration (with no sources).
//! [`Config::validate`] runs at load time and names the offending key, so a bad value
//! is reported before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::names::{BranchName, SourceName};

/// Prefix of environment overrides: `OFFSHOOT__PROXY__LISTEN=0.0.0.0:6432`.
pub const ENV_PREFIX: &str = "OFFSHOOT";

/// The whole configuration tree.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The client-facing listener and the startup phase.
    pub proxy: ProxyConfig,
    /// TLS towards clients; off unless both `cert` and `key` are set.
    pub tls: TlsConfig,
    /// How clients prove who they are before any branch is looked up or made.
    pub auth: AuthConfig,
    /// The HTTP endpoint for metrics, health and the branch API.
    pub admin: AdminConfig,
    /// Where the proxy keeps branch records (and the embedded server's data).
    pub state: StateConfig,
    /// The managed local PostgreSQL used by sources that name no `server`.
    pub embedded: EmbeddedConfig,
    /// The idle reaper.
    pub reaper: ReaperConfig,
    /// The databases branches are cloned from, by name.
    pub sources: BTreeMap<String, SourceConfig>,
}

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
    /// authentication relay, byte pump). 0 means one per CPU core.
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
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// The proxy checks nothing and relays the branch server's own authentication
    /// exchange. Anyone who can reach the proxy can make branches: local use only.
    Trust,
    /// Cleartext password, checked by the proxy; only over TLS.
    Password,
    /// SCRAM-SHA-256, with SCRAM-SHA-256-PLUS (channel binding) over TLS.
    #[default]
    ScramSha256,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Password => "password",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

/// TLS on the proxy's own connections to a source's server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    /// Plain connections (a private network or a Unix socket).
    #[default]
    Disable,
    /// Encrypted, the certificate not checked (libpq's `sslmode=require`).
    Require,
    /// Encrypted, the certificate checked against `server_ca` and the host name.
    VerifyFull,
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
    /// dedicated connection with `search_path = pg_catalog`.
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
    /// Address of the HTTP endpoint; it has no authentication, so keep it private.
    pub listen: SocketAddr,
    /// Set to false to run without the HTTP endpoint.
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".parse().expect("valid default address"),
            enabled: true,
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
}

impl Default for ReaperConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
        }
    }
}

/// How a source's branches are made.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `CREATE DATABASE <clone> TEMPLATE <source>` on the source's server.
    #[default]
    Database,
    /// A PostgreSQL instance of its own per branch, on a copy-on-write copy of a
    /// sealed snapshot of the source's data directory.
    Instance,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub engine: EngineKind,
    /// Connection string (URL or key=value) of a role that may create databases on the
    /// source's server. Its database is only used for administration; unset means
    /// the embedded server.
    pub server: Option<String>,
    /// The database branches are cloned from; defaults to the source's name.
    pub database: Option<String>,
    /// Branch used when a client names the source without a branch; unset means
    /// such a client gets an error.
    pub default_branch: Option<String>,
    /// A branch nobody has used for this long is dropped. Unset: never.
    #[serde(with = "humantime_serde")]
    pub idle_expire: Option<Duration>,
    /// Most branches this source may have at once (made on connect or by the API).
    pub max_branches: usize,
    /// Branches that never expire (long-lived QA environments).
    pub persistent: Vec<String>,
    /// Seed the demo shop schema into the source database when it does not exist yet
    /// (embedded server only).
    pub seed_demo: bool,
    /// Let replication connections (`replication=...` in the startup packet) through
    /// to branches; refused by default.
    pub allow_replication: bool,
    /// Overrides `auth.method` for this source.
    pub auth_method: Option<AuthMethod>,
    /// Connection string the `auth.query` runs on; unset: `server` (or the embedded
    /// server). A role allowed to read `pg_authid`, or to call a SECURITY DEFINER
    /// function that does.
    pub auth_server: Option<String>,
    /// Roles that may connect to this source's branches; empty: every role that
    /// authenticates.
    pub connect_roles: Vec<String>,
    /// Roles that may cause a new branch to be made by connecting; empty: every role
    /// allowed to connect.
    pub create_roles: Vec<String>,
    /// Most branches one role may have made by connecting; 0: no limit besides
    /// `max_branches`.
    pub max_branches_per_role: usize,
    /// TLS on every connection the proxy makes to this source's server (sessions,
    /// administration, `auth.query`, cancels). Only for TCP servers.
    pub server_tls: ServerTls,
    /// PEM CA certificates trusted for `server_tls = "verify-full"`.
    pub server_ca: Option<PathBuf>,
    /// `instance` engine: the running server snapshots are copied from with
    /// `pg_basebackup -X stream` (a role with the REPLICATION attribute). Unset, and
    /// no `data_dir`: the embedded server.
    pub upstream: Option<String>,
    /// `instance` engine: a stopped PostgreSQL data directory snapshots are copied
    /// from, instead of `upstream`.
    pub data_dir: Option<PathBuf>,
    /// `instance` engine: where snapshots and clones live; both must be on one
    /// filesystem, and it should support reflinks (XFS, Btrfs). Unset:
    /// `<state.dir>/instances/<source>`.
    pub storage: Option<PathBuf>,
    /// `instance` engine: `shared_buffers` of each branch's server.
    pub shared_buffers: String,
    /// `instance` engine: `max_connections` of each branch's server.
    pub max_connections: u32,
    /// `instance` engine: further settings (`name = "value"`) for each branch's
    /// server, passed as `postgres -c name=value`.
    pub settings: BTreeMap<String, String>,
    /// `instance` engine: a branch's server unused for this long is stopped (its data
    /// stays; the next connection starts it again). Unset: never.
    #[serde(with = "humantime_serde")]
    pub suspend_after: Option<Duration>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            engine: EngineKind::Database,
            server: None,
            database: None,
            default_branch: None,
            idle_expire: Some(Duration::from_secs(2 * 3600)),
            max_branches: 50,
            persistent: Vec::new(),
            seed_demo: false,
            allow_replication: false,
            auth_method: None,
            auth_server: None,
            connect_roles: Vec::new(),
            create_roles: Vec::new(),
            max_branches_per_role: 0,
            server_tls: ServerTls::Disable,
            server_ca: None,
            upstream: None,
            data_dir: None,
            storage: None,
            shared_buffers: "32MB".into(),
            max_connections: 25,
            settings: BTreeMap::new(),
            suspend_after: Some(Duration::from_secs(5 * 60)),
        }
    }
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Loads `path` (which must exist) and applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(invalid(
                "--config",
                format!("file {} does not exist", path.display()),
            ));
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("sources.*.persistent")
                    .with_list_parse_key("sources.*.connect_roles")
                    .with_list_parse_key("sources.*.create_roles"),
            )
            .build()?;
        let cfg: Config = raw.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document (no environment); used by tests and `offshoot check`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        let cfg: Config = raw.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sep = &self.proxy.separator;
        if sep.chars().count() != 1 {
            return Err(invalid("proxy.separator", "must be exactly one character"));
        }
        let c = sep.chars().next().expect("one char");
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            return Err(invalid(
                "proxy.separator",
                format!("{sep:?} can appear in branch names; use '.' or another punctuation mark"),
            ));
        }
        if self.proxy.startup_timeout.is_zero() {
            return Err(invalid(
                "proxy.startup_timeout",
                "must be greater than zero",
            ));
        }
        if self.proxy.provision_timeout.is_zero() {
            return Err(invalid(
                "proxy.provision_timeout",
                "must be greater than zero",
            ));
        }
        if self.proxy.max_connections == 0 {
            return Err(invalid("proxy.max_connections", "must be at least 1"));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                if self.tls.cert.is_some() {
                    "tls.key"
                } else {
                    "tls.cert"
                },
                "TLS needs both `tls.cert` and `tls.key`",
            ));
        }
        if self.tls.mode == TlsMode::Require && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.mode",
                "\"require\" needs `tls.cert` and `tls.key`",
            ));
        }
        if let Some(suffix) = &self.tls.sni_suffix {
            if suffix.is_empty() || suffix.starts_with('.') || suffix.ends_with('.') {
                return Err(invalid(
                    "tls.sni_suffix",
                    "a domain such as \"db.example.com\", without leading or trailing dots",
                ));
            }
        }
        if !self.auth.query.contains("$1") {
            return Err(invalid("auth.query", "must take the role name as $1"));
        }
        if self.reaper.interval.is_zero() {
            return Err(invalid("reaper.interval", "must be greater than zero"));
        }
        for (name, src) in &self.sources {
            let key = |field: &str| format!("sources.{name}.{field}");
            SourceName::new(name).map_err(|e| invalid(format!("sources.{name}"), e.to_string()))?;
            if let Some(db) = &src.database {
                if db.is_empty() || db.len() > crate::names::MAX_IDENT_LEN {
                    return Err(invalid(key("database"), "must be 1 to 63 bytes"));
                }
            }
            if let Some(server) = &src.server {
                server
                    .parse::<tokio_postgres::Config>()
                    .map_err(|e| invalid(key("server"), format!("not a connection string: {e}")))?;
            }
            if let Some(b) = &src.default_branch {
                BranchName::new(b).map_err(|e| invalid(key("default_branch"), e.to_string()))?;
            }
            for b in &src.persistent {
                BranchName::new(b).map_err(|e| invalid(key("persistent"), e.to_string()))?;
            }
            if src.max_branches == 0 {
                return Err(invalid(key("max_branches"), "must be at least 1"));
            }
            if matches!(src.idle_expire, Some(d) if d.is_zero()) {
                return Err(invalid(key("idle_expire"), "must be greater than zero"));
            }
            if let Some(server) = &src.auth_server {
                server.parse::<tokio_postgres::Config>().map_err(|e| {
                    invalid(key("auth_server"), format!("not a connection string: {e}"))
                })?;
            }
            if src.server_tls == ServerTls::VerifyFull && src.server_ca.is_none() {
                return Err(invalid(
                    key("server_ca"),
                    "server_tls = \"verify-full\" needs the CA file that signed the server's certificate",
                ));
            }
            if src.server_tls != ServerTls::Disable && src.server.is_none() {
                return Err(invalid(
                    key("server_tls"),
                    "the embedded server is reached over a Unix socket; TLS needs a `server`",
                ));
            }
            let method = src.auth_method.unwrap_or(self.auth.method);
            if method != AuthMethod::Trust
                && src.server.is_none()
                && src.upstream.is_none()
                && src.auth_server.is_none()
                && !src.uses_embedded()
            {
                return Err(invalid(
                    key("auth_server"),
                    "this source names no server whose roles the proxy could check; set \
                     auth_server (or auth_method = \"trust\")",
                ));
            }
            if method == AuthMethod::Trust
                && (!src.connect_roles.is_empty()
                    || !src.create_roles.is_empty()
                    || src.max_branches_per_role > 0)
            {
                return Err(invalid(
                    key("auth_method"),
                    "roles cannot be restricted under \"trust\": nobody is authenticated",
                ));
            }
            if src.seed_demo && (src.server.is_some() || !src.uses_embedded()) {
                return Err(invalid(
                    key("seed_demo"),
                    "only the embedded server is seeded; remove `server` or `seed_demo`",
                ));
            }
            src.validate_engine(&key)?;
        }
        Ok(())
    }

    /// The authentication method of a source (or of a name that is no source).
    pub fn auth_method(&self, source: Option<&str>) -> AuthMethod {
        source
            .and_then(|s| self.sources.get(s))
            .and_then(|s| s.auth_method)
            .unwrap_or(self.auth.method)
    }

    /// True when at least one source lives on the embedded server.
    pub fn needs_embedded(&self) -> bool {
        self.sources.values().any(SourceConfig::uses_embedded)
    }
}

impl SourceConfig {
    /// Whether this source's data comes from the embedded server.
    pub fn uses_embedded(&self) -> bool {
        match self.engine {
            EngineKind::Database => self.server.is_none(),
            EngineKind::Instance => self.upstream.is_none() && self.data_dir.is_none(),
        }
    }

    /// The keys that belong to one engine only.
    fn validate_engine(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        match self.engine {
            EngineKind::Database => {
                for (field, set) in [
                    ("upstream", self.upstream.is_some()),
                    ("data_dir", self.data_dir.is_some()),
                    ("storage", self.storage.is_some()),
                ] {
                    if set {
                        return Err(invalid(
                            key(field),
                            "only `engine = \"instance\"` sources use it",
                        ));
                    }
                }
            }
            EngineKind::Instance => {
                if self.server.is_some() {
                    return Err(invalid(
                        key("server"),
                        "an `instance` source copies a whole server: name it with `upstream` \
                         (pg_basebackup) or `data_dir`",
                    ));
                }
                if self.upstream.is_some() && self.data_dir.is_some() {
                    return Err(invalid(
                        key("data_dir"),
                        "set either `upstream` or `data_dir`, not both",
                    ));
                }
                if let Some(up) = &self.upstream {
                    up.parse::<tokio_postgres::Config>().map_err(|e| {
                        invalid(key("upstream"), format!("not a connection string: {e}"))
                    })?;
                }
                if let Some(dir) = &self.data_dir {
                    if !dir.is_absolute() {
                        return Err(invalid(key("data_dir"), "must be an absolute path"));
                    }
                }
                if self.max_connections == 0 {
                    return Err(invalid(key("max_connections"), "must be at least 1"));
                }
                if self.shared_buffers.trim().is_empty() {
                    return Err(invalid(key("shared_buffers"), "must not be empty"));
                }
                for name in self.settings.keys() {
                    let ok = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
                    if !ok {
                        return Err(invalid(
                            key(&format!("settings.{name}")),
                            "not a PostgreSQL setting name",
                        ));
                    }
                }
                if matches!(self.suspend_after, Some(d) if d.is_zero()) {
                    return Err(invalid(key("suspend_after"), "must be greater than zero"));
                }
            }
        }
        Ok(())
    }

    /// The template database name.
    pub fn database_name<'a>(&'a self, source: &'a str) -> &'a str {
        self.database.as_deref().unwrap_or(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_valid() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.proxy.listen.port(), 6432);
        assert_eq!(cfg.proxy.separator, ".");
        assert!(cfg.sources.is_empty());
    }

    #[test]
    fn durations_are_human() {
        let cfg = Config::from_toml(
            "[proxy]\nstartup_timeout = \"250ms\"\n[sources.shop]\nidle_expire = \"2h\"\n",
        )
        .unwrap();
        assert_eq!(cfg.proxy.startup_timeout, Duration::from_millis(250));
        assert_eq!(
            cfg.sources["shop"].idle_expire,
            Some(Duration::from_secs(7200))
        );
    }

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[proxy]\nseparator = \"-\"\n").contains("proxy.separator"));
        assert!(err("[sources.shop]\npersistent = [\"Bad Name\"]\n")
            .contains("sources.shop.persistent"));
        assert!(err("[sources.shop]\nmax_branches = 0\n").contains("sources.shop.max_branches"));
        assert!(err("[tls]\ncert = \"a.pem\"\n").contains("tls.key"));
        assert!(err("[tls]\nmode = \"require\"\n").contains("tls.mode"));
        assert!(err("[tls]\nmode = \"always\"\n").contains("mode"));
        assert!(err("[proxy]\nlisten = \"nowhere\"\n").contains("listen"));
        assert!(err("[proxy]\nstartup_timeout = \"soon\"\n").contains("startup_timeout"));
        assert!(err("[proxy]\nlisten_typo = 1\n").contains("listen_typo"));
        assert!(err("[sources.\"a.b\"]\n").contains("sources.a.b"));
        assert!(err("[auth]\nmethod = \"md4\"\n").contains("method"));
        assert!(err("[auth]\nquery = \"SELECT 1\"\n").contains("auth.query"));
        assert!(
            err("[auth]\nmethod = \"trust\"\n[sources.shop]\ncreate_roles = [\"a\"]\n")
                .contains("sources.shop.auth_method")
        );
        assert!(err("[sources.s]\nupstream = \"host=x\"\n").contains("sources.s.upstream"));
        assert!(
            err("[sources.s]\nengine = \"instance\"\nserver = \"host=x\"\n")
                .contains("sources.s.server")
        );
        assert!(err(
            "[sources.s]\nengine = \"instance\"\nupstream = \"host=x\"\ndata_dir = \"/d\"\n"
        )
        .contains("sources.s.data_dir"));
        assert!(
            err("[sources.s]\nengine = \"instance\"\nsettings = { \"bad name\" = \"1\" }\n")
                .contains("sources.s.settings.bad name")
        );
    }

    #[test]
    fn instance_sources_default_to_small_suspendable_servers() {
        let cfg = Config::from_toml(
            "[sources.full]\nengine = \"instance\"\n[sources.full.settings]\nfsync = \"off\"\n",
        )
        .unwrap();
        let src = &cfg.sources["full"];
        assert_eq!(src.engine, EngineKind::Instance);
        assert_eq!(src.suspend_after, Some(Duration::from_secs(300)));
        assert_eq!(src.settings["fsync"], "off");
        assert!(cfg.needs_embedded());
    }
}
