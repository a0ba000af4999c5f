//! Typed configuration: a TOML file plus `OFFSHOOT__SECTION__KEY` environment overrides.
//!
//! This is the only module that reads configuration files or the environment. Every
//! field has a default, so an empty file is a valid configuration (with no sources).
//! Values are typed as they are read (source and branch names included), and
//! [`Config::validate`] runs at load time; every error names the offending key, so a
//! bad value is reported before anything starts.
//!
//! Layout: `sections` (the listener, TLS, authentication, admin, state, embedded
//! server and reaper sections), `source` (one source and the keys of its engine),
//! `policy` (branch policies by name pattern, and how one is resolved for a branch),
//! `values` (limits, sizes, times of day), `webhooks` (`[[webhooks]]`), `process`
//! (the OS users when started as root), `keys` (how errors come to name their key).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::names::SourceName;

mod keys;
mod policy;
mod process;
mod sections;
mod snapshots;
mod source;
mod values;
mod webhooks;

use keys::{invalid, located};
pub use policy::{Glob, Policy, PolicyConfig};
pub use process::ProcessConfig;
pub use sections::*;
pub use source::{
    CloneStrategy, DatabaseConfig, EngineConfig, EngineKind, InstanceConfig, ServerTls,
    SourceConfig,
};
pub use values::{ByteSize, Limit, Refresh, TimeOfDay};
pub use webhooks::WebhookConfig;

/// The configuration file read unless `--config` or `OFFSHOOT_CONFIG` names another.
pub const DEFAULT_PATH: &str = "conf/offshoot.toml";

/// Prefix of environment overrides: `OFFSHOOT__PROXY__LISTEN=0.0.0.0:6432`.
pub const ENV_PREFIX: &str = "OFFSHOOT";

/// Source keys whose environment override is a comma-separated list:
/// `OFFSHOOT__SOURCES__SHOP__PERSISTENT=qa,staging` (and `admin.allowed_hosts`).
const LIST_KEYS: [&str; 4] = [
    "persistent",
    "connect_roles",
    "create_roles",
    "snapshot_transform",
];

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
    /// Migration rehearsals the admin API runs (`POST /api/v1/rehearsals`).
    pub rehearsal: RehearsalConfig,
    /// The OS users of the proxy and of branch servers when started as root.
    pub process: ProcessConfig,
    /// HTTP endpoints sent the events of the audit trail (`[[webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
    /// The databases branches are cloned from, by name. Read table by table after
    /// the rest (see [`source`]): which keys a source may have depends on its engine.
    #[serde(skip)]
    pub sources: BTreeMap<SourceName, SourceConfig>,
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
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
        // The environment splits a value at commas only for keys it is given by their
        // whole name, so the source names are read first.
        let first = Self::builder(path, Vec::new()).build()?;
        let lists = first
            .get_table("sources")
            .unwrap_or_default()
            .into_keys()
            .flat_map(|name| LIST_KEYS.map(|key| format!("sources.{name}.{key}")))
            .chain(["admin.allowed_hosts".to_owned()])
            .collect();
        Self::from_raw(Self::builder(path, lists).build()?)
    }

    fn builder(
        path: &Path,
        lists: Vec<String>,
    ) -> config::ConfigBuilder<config::builder::DefaultState> {
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        let env = lists
            .into_iter()
            .fold(env, |env, key| env.with_list_parse_key(&key));
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env)
    }

    /// Parses a TOML document (no environment); used by tests.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        Self::from_raw(raw)
    }

    /// Types the merged tree: the sections, then each source, then [`Self::validate`].
    fn from_raw(raw: config::Config) -> Result<Self, ConfigError> {
        let mut tree: config::Map<String, config::Value> = raw.try_deserialize()?;
        let sources = tree.remove("sources");
        let mut cfg: Config = config::Value::from(tree).try_deserialize()?;
        if let Some(sources) = sources {
            let tables: BTreeMap<String, config::Value> = sources
                .into_table()
                .map_err(|e| located("sources", e))?
                .into_iter()
                .collect();
            for (name, table) in tables {
                let (name, source) = source::parse(&name, table)?;
                cfg.sources.insert(name, source);
            }
        }
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
        if self.rehearsal.max_running == 0 {
            return Err(invalid("rehearsal.max_running", "must be at least 1"));
        }
        if self
            .rehearsal
            .sql_dir
            .as_ref()
            .is_some_and(|d| !d.is_absolute())
        {
            return Err(invalid("rehearsal.sql_dir", "must be an absolute path"));
        }
        if self.admin.enabled && self.admin.public_read && !self.admin.listen.ip().is_loopback() {
            return Err(invalid(
                "admin.public_read",
                format!(
                    "admin.listen ({}) is not a loopback address, so every request needs \
                     the token; remove public_read or listen on 127.0.0.1",
                    self.admin.listen
                ),
            ));
        }
        for (i, host) in self.admin.allowed_hosts.iter().enumerate() {
            let name_ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !name_ok && host.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    format!("admin.allowed_hosts[{i}]"),
                    format!("{host:?} is not a host name or address (write it without a port)"),
                ));
            }
        }
        if self.reaper.interval.is_zero() {
            return Err(invalid("reaper.interval", "must be greater than zero"));
        }
        if self.reaper.size_interval.is_zero() {
            return Err(invalid("reaper.size_interval", "must be greater than zero"));
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            hook.validate(i)?;
        }
        for (name, src) in &self.sources {
            src.validate(name, self.auth.method)?;
        }
        self.process.validate(&self.sources)?;
        Ok(())
    }

    /// The authentication method of a source (or of a name that is no source).
    pub fn auth_method(&self, source: Option<&str>) -> AuthMethod {
        source
            .and_then(|s| SourceName::new(s).ok())
            .and_then(|s| self.sources.get(&s))
            .and_then(|s| s.auth_method)
            .unwrap_or(self.auth.method)
    }

    /// True when at least one source lives on the embedded server.
    pub fn needs_embedded(&self) -> bool {
        self.sources.values().any(SourceConfig::uses_embedded)
    }
}

#[cfg(test)]
mod tests;
