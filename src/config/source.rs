//! One source: the keys every source has ([`SourceConfig`]) and those of its engine
//! ([`EngineConfig`]).
//!
//! A source's table is read in two steps: `engine` picks the variant and takes out
//! that engine's keys; what is left must be keys every source has. So a key of the
//! other engine (or a typo) is an error naming it, before anything starts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::keys::{invalid, keys_of, located};
use super::policy::PolicyConfig;
use super::values::{ByteSize, Refresh, TimeOfDay};
use super::{AuthMethod, ConfigError};
use crate::names::{BranchName, SourceName, MAX_IDENT_LEN};

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

/// How a source's branches are made.
#[derive(
    Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `CREATE DATABASE <clone> TEMPLATE <source>` on the source's server.
    #[default]
    Database,
    /// A PostgreSQL instance of its own per branch, on a copy-on-write copy of a
    /// sealed snapshot of the source's data directory.
    Instance,
}

/// A source: the keys every engine has, plus its engine's own in [`EngineConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// `database` engine: the template database; `instance` engine: the database a
    /// branch's clients land on. Defaults to the source's name.
    pub database: Option<String>,
    /// Branch used when a client names the source without a branch; unset means
    /// such a client gets an error.
    pub default_branch: Option<BranchName>,
    /// A branch nobody has used for this long is dropped. Unset: never.
    #[serde(with = "humantime_serde")]
    pub idle_expire: Option<Duration>,
    /// Most branches this source may have at once (made on connect or by the API).
    pub max_branches: usize,
    /// Branches that never expire (long-lived QA environments).
    pub persistent: Vec<BranchName>,
    /// A branch is removed this long after its creation (or its last reset), used or
    /// not. Unset: never.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Whether a new snapshot resets this source's branches (`"on_snapshot"`, at the
    /// first moment a branch has no session) or not (`"never"`).
    pub refresh: Refresh,
    /// Per-branch-name policies (`[[sources.<name>.policies]]`), first match wins;
    /// the keys above are the defaults of a key a policy does not set.
    pub policies: Vec<PolicyConfig>,
    /// Take a snapshot of the source this often. Unset: only on demand.
    #[serde(with = "humantime_serde")]
    pub snapshot_every: Option<Duration>,
    /// The time of day (`"HH:MM"`, UTC) the scheduled snapshots are aligned to.
    pub snapshot_at: Option<TimeOfDay>,
    /// Scheduled snapshots kept; older ones that no branch uses are deleted. Unset:
    /// all are kept.
    pub keep_snapshots: Option<usize>,
    /// SQL files run on each new snapshot, as its superuser, before it is sealed and
    /// before any branch is made from it (e.g. masking personal data).
    pub snapshot_transform: Vec<PathBuf>,
    /// Most bytes this source's branches may hold together; a new branch beyond it
    /// is refused. Unset: no limit.
    pub max_total_size: Option<ByteSize>,
    /// Seed the demo shop schema into the source database when it does not exist yet
    /// (embedded server only).
    pub seed_demo: bool,
    /// Let replication connections (`replication=...` in the startup packet) through
    /// to branches; refused by default.
    pub allow_replication: bool,
    /// Let roles that are superusers on the source's server log in to its branches
    /// (default true). A superuser in a clone can run programs as the branch
    /// servers' OS user (`COPY ... TO PROGRAM`); set false where that matters, and
    /// such logins are refused at the proxy with 42501.
    pub allow_superuser: bool,
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
    /// Keep a server session open after its client ends cleanly and hand it, reset,
    /// to the next client of the same role, database and startup parameters
    /// (default true). Where the proxy does not authenticate clients itself
    /// (`trust`), only sessions the server opened without asking for a password are
    /// kept. See `proxy.server_idle_timeout` and `proxy.max_idle_per_branch`.
    pub server_reuse: bool,
    /// How branches are made (`engine = "database"` or `"instance"`) and the keys
    /// that only that engine has. Read by [`parse`] before the other keys, so a key of
    /// the other engine is an error naming it.
    #[serde(skip)]
    pub engine: EngineConfig,
}

/// The keys only one engine has, by engine.
#[derive(Debug, Clone)]
pub enum EngineConfig {
    /// `engine = "database"`: clones are databases on the source's server.
    Database(DatabaseConfig),
    /// `engine = "instance"`: each clone is a PostgreSQL server of its own.
    Instance(InstanceConfig),
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::Database(DatabaseConfig::default())
    }
}

impl EngineConfig {
    pub fn kind(&self) -> EngineKind {
        match self {
            EngineConfig::Database(_) => EngineKind::Database,
            EngineConfig::Instance(_) => EngineKind::Instance,
        }
    }
}

/// Keys of `engine = "database"` sources.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Connection string (URL or key=value) of a role that may create databases on the
    /// source's server. Its database is only used for administration; unset means
    /// the embedded server.
    pub server: Option<String>,
    /// How `CREATE DATABASE` copies the template: `auto` (the fastest safe way the
    /// server has), `file_copy` or `wal_log`.
    pub clone_strategy: CloneStrategy,
}

/// `clone_strategy` of a `database` source.
#[derive(
    Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CloneStrategy {
    /// `STRATEGY FILE_COPY`, with `file_copy_method = clone` on PostgreSQL 18 and
    /// later when a probe clone works there (copy-on-write on XFS, Btrfs: a clone
    /// costs the same whatever the size); before 15, the server's only way.
    #[default]
    Auto,
    /// `STRATEGY FILE_COPY` with plain copies: every byte, two checkpoints per
    /// clone; a failed copy (a full disk) leaves nothing behind.
    FileCopy,
    /// `STRATEGY WAL_LOG`: no checkpoints, every block written to the WAL; best for
    /// small sources on a server under heavy write load. A copy that fails part
    /// way (a full disk) can leave files the server does not remove.
    WalLog,
}

/// Keys of `engine = "instance"` sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// The running server snapshots are copied from with `pg_basebackup -X stream`
    /// (a role with the REPLICATION attribute). Unset, and no `data_dir`: the
    /// embedded server.
    pub upstream: Option<String>,
    /// A stopped PostgreSQL data directory snapshots are copied from, instead of
    /// `upstream`.
    pub data_dir: Option<PathBuf>,
    /// Where snapshots and clones live; both must be on one filesystem, and it should
    /// support reflinks (XFS, Btrfs). Unset: `<state.dir>/instances/<source>`.
    pub storage: Option<PathBuf>,
    /// `shared_buffers` of each branch's server.
    pub shared_buffers: String,
    /// `max_connections` of each branch's server.
    pub max_connections: u32,
    /// Further settings (`name = "value"`) for each branch's server, passed as
    /// `postgres -c name=value`.
    pub settings: BTreeMap<String, String>,
    /// A branch's server unused for this long is stopped (its data stays; the next
    /// connection starts it again). Unset: never.
    #[serde(with = "humantime_serde")]
    pub suspend_after: Option<Duration>,
    /// Clones of the newest snapshot kept copied and started, so a new branch takes
    /// one ready-made instead of waiting for a copy and a server start. 0: none.
    pub warm_spares: u32,
}

/// The most `warm_spares` a source may keep: each is a running server.
pub const MAX_WARM_SPARES: u32 = 16;

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            upstream: None,
            data_dir: None,
            storage: None,
            shared_buffers: "32MB".into(),
            max_connections: 25,
            settings: BTreeMap::new(),
            suspend_after: Some(Duration::from_secs(5 * 60)),
            warm_spares: 0,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            database: None,
            default_branch: None,
            idle_expire: Some(Duration::from_secs(2 * 3600)),
            max_branches: 50,
            persistent: Vec::new(),
            max_lifetime: None,
            refresh: Refresh::Never,
            policies: Vec::new(),
            snapshot_every: None,
            snapshot_at: None,
            keep_snapshots: None,
            snapshot_transform: Vec::new(),
            max_total_size: None,
            seed_demo: false,
            allow_replication: false,
            allow_superuser: true,
            auth_method: None,
            auth_server: None,
            connect_roles: Vec::new(),
            create_roles: Vec::new(),
            max_branches_per_role: 0,
            server_tls: ServerTls::Disable,
            server_ca: None,
            server_reuse: true,
            engine: EngineConfig::default(),
        }
    }
}

impl EngineKind {
    fn as_str(self) -> &'static str {
        match self {
            EngineKind::Database => "database",
            EngineKind::Instance => "instance",
        }
    }

    /// The keys only this engine has.
    fn keys(self) -> &'static [&'static str] {
        match self {
            EngineKind::Database => keys_of::<DatabaseConfig>(),
            EngineKind::Instance => keys_of::<InstanceConfig>(),
        }
    }

    /// Why `key`, which neither this engine nor every source has, is refused.
    fn unknown_key(self, key: &str) -> String {
        let mut problem = format!("unknown key for engine \"{}\"", self.as_str());
        if self == EngineKind::Instance && key == "server" {
            problem.push_str(
                ": an `instance` source copies a whole server; name it with `upstream` \
                 (pg_basebackup) or `data_dir`",
            );
        } else {
            let other = match self {
                EngineKind::Database => EngineKind::Instance,
                EngineKind::Instance => EngineKind::Database,
            };
            if other.keys().contains(&key) {
                problem.push_str(&format!(
                    " (only `engine = \"{}\"` sources have it)",
                    other.as_str()
                ));
            }
        }
        problem
    }
}

/// Reads the table of `sources.<name>`: the name, the engine and its keys, then the
/// keys every source has. Errors name the key.
pub(super) fn parse(
    name: &str,
    table: config::Value,
) -> Result<(SourceName, SourceConfig), ConfigError> {
    let here = format!("sources.{name}");
    let source = SourceName::new(name).map_err(|e| invalid(&here, e.to_string()))?;
    let mut table = table.into_table().map_err(|e| located(&here, e))?;
    let kind = match table.remove("engine") {
        Some(v) => v
            .try_deserialize::<EngineKind>()
            .map_err(|e| located(&format!("{here}.engine"), e))?,
        None => EngineKind::default(),
    };
    let mut names: Vec<String> = table.keys().cloned().collect();
    names.sort();
    let mut own = config::Map::new();
    for key in names {
        if kind.keys().contains(&key.as_str()) {
            let value = table.remove(&key).expect("listed key");
            own.insert(key, value);
        } else if !keys_of::<SourceConfig>().contains(&key.as_str()) {
            return Err(invalid(format!("{here}.{key}"), kind.unknown_key(&key)));
        }
    }
    let mut cfg: SourceConfig = config::Value::from(table)
        .try_deserialize()
        .map_err(|e| located(&here, e))?;
    let own = config::Value::from(own);
    cfg.engine = match kind {
        EngineKind::Database => {
            EngineConfig::Database(own.try_deserialize().map_err(|e| located(&here, e))?)
        }
        EngineKind::Instance => {
            EngineConfig::Instance(own.try_deserialize().map_err(|e| located(&here, e))?)
        }
    };
    Ok((source, cfg))
}

impl SourceConfig {
    /// Whether this source's data comes from the embedded server.
    pub fn uses_embedded(&self) -> bool {
        match &self.engine {
            EngineConfig::Database(db) => db.server.is_none(),
            EngineConfig::Instance(i) => i.upstream.is_none() && i.data_dir.is_none(),
        }
    }

    /// The source's server (`database` engine); `None` for the embedded server and
    /// for `instance` sources.
    pub fn server(&self) -> Option<&str> {
        match &self.engine {
            EngineConfig::Database(db) => db.server.as_deref(),
            EngineConfig::Instance(_) => None,
        }
    }

    /// The server `instance` snapshots are copied from, when it is not the embedded
    /// one.
    pub fn upstream(&self) -> Option<&str> {
        match &self.engine {
            EngineConfig::Instance(i) => i.upstream.as_deref(),
            EngineConfig::Database(_) => None,
        }
    }

    /// How long an unused branch's server runs before it is stopped; `None` for
    /// engines without a server per branch, or when never.
    pub fn suspend_after(&self) -> Option<Duration> {
        match &self.engine {
            EngineConfig::Instance(i) => i.suspend_after,
            EngineConfig::Database(_) => None,
        }
    }

    /// `clone_strategy` (`database` engine); `None` for `instance` sources.
    pub fn clone_strategy(&self) -> Option<CloneStrategy> {
        match &self.engine {
            EngineConfig::Database(d) => Some(d.clone_strategy),
            EngineConfig::Instance(_) => None,
        }
    }

    /// The database name: the template (`database` engine) or where clients land.
    pub fn database_name<'a>(&'a self, source: &'a str) -> &'a str {
        self.database.as_deref().unwrap_or(source)
    }

    /// Checks what types alone cannot; the error names the key. `method` is
    /// `auth.method`, which applies unless the source sets its own.
    pub(super) fn validate(
        &self,
        name: &SourceName,
        method: AuthMethod,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("sources.{name}.{field}");
        if let Some(db) = &self.database {
            if db.is_empty() || db.len() > MAX_IDENT_LEN {
                return Err(invalid(key("database"), "must be 1 to 63 bytes"));
            }
        }
        if self.max_branches == 0 {
            return Err(invalid(key("max_branches"), "must be at least 1"));
        }
        if matches!(self.idle_expire, Some(d) if d.is_zero()) {
            return Err(invalid(key("idle_expire"), "must be greater than zero"));
        }
        if matches!(self.max_lifetime, Some(d) if d.is_zero()) {
            return Err(invalid(key("max_lifetime"), "must be greater than zero"));
        }
        self.validate_policies(&key)?;
        self.validate_snapshots(&key)?;
        if let Some(server) = &self.auth_server {
            server.parse::<tokio_postgres::Config>().map_err(|e| {
                invalid(key("auth_server"), format!("not a connection string: {e}"))
            })?;
        }
        if self.server_tls == ServerTls::VerifyFull && self.server_ca.is_none() {
            return Err(invalid(
                key("server_ca"),
                "server_tls = \"verify-full\" needs the CA file that signed the server's certificate",
            ));
        }
        if self.server_tls != ServerTls::Disable && self.server().is_none() {
            return Err(invalid(
                key("server_tls"),
                "the embedded server is reached over a Unix socket; TLS needs a `server`",
            ));
        }
        let method = self.auth_method.unwrap_or(method);
        if method != AuthMethod::Trust && self.auth_server.is_none() && self.auth_roles_unknown() {
            return Err(invalid(
                key("auth_server"),
                "this source names no server whose roles the proxy could check; set \
                 auth_server (or auth_method = \"trust\")",
            ));
        }
        if method == AuthMethod::Trust
            && (!self.connect_roles.is_empty()
                || !self.create_roles.is_empty()
                || self.max_branches_per_role > 0
                || self.policies_restrict_roles())
        {
            return Err(invalid(
                key("auth_method"),
                "roles cannot be restricted under \"trust\": nobody is authenticated",
            ));
        }
        if self.seed_demo && !self.uses_embedded() {
            return Err(invalid(
                key("seed_demo"),
                "only the embedded server is seeded; remove `server` or `seed_demo`",
            ));
        }
        match &self.engine {
            EngineConfig::Database(db) => db.validate(&key),
            EngineConfig::Instance(i) => i.validate(&key),
        }
    }

    /// True when no server the source names has its roles: an `instance` source
    /// copied from a stopped data directory.
    fn auth_roles_unknown(&self) -> bool {
        self.server().is_none() && self.upstream().is_none() && !self.uses_embedded()
    }
}

impl DatabaseConfig {
    fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        if let Some(server) = &self.server {
            server
                .parse::<tokio_postgres::Config>()
                .map_err(|e| invalid(key("server"), format!("not a connection string: {e}")))?;
        }
        Ok(())
    }
}

impl InstanceConfig {
    fn validate(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        if self.upstream.is_some() && self.data_dir.is_some() {
            return Err(invalid(
                key("data_dir"),
                "set either `upstream` or `data_dir`, not both",
            ));
        }
        if let Some(up) = &self.upstream {
            up.parse::<tokio_postgres::Config>()
                .map_err(|e| invalid(key("upstream"), format!("not a connection string: {e}")))?;
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
        if self.warm_spares > MAX_WARM_SPARES {
            return Err(invalid(
                key("warm_spares"),
                format!(
                    "at most {MAX_WARM_SPARES}: every spare is a running server with its own \
                     memory"
                ),
            ));
        }
        Ok(())
    }
}
