//! `[process]`: the OS users the proxy and its branch servers run as when the proxy
//! is started as root (see `privsep`). Started as any other user, none of this
//! applies: the proxy and its servers run as that user.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::keys::invalid;
use super::{ConfigError, EngineConfig, SourceConfig};
use crate::names::SourceName;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// The user the network-facing process becomes once it has bound its
    /// listeners and read its keys, when started as root. `"root"` keeps it root
    /// (an explicit opt-out, warned about at every start).
    pub user: String,
    /// The user branch servers (and the embedded server) run as, when started as
    /// root; it must differ from `user`, so a branch server's user cannot read what
    /// the proxy keeps.
    pub server_user: String,
    /// `instance` sources whose branch servers run as a user of their own, apart
    /// from other sources' (`billing = "pg_billing"`); the others use
    /// `server_user`. A superuser in one clone reaches the clones of sources that
    /// share its user, never those of another user.
    pub server_users: BTreeMap<String, String>,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            user: "offshoot".into(),
            server_user: "postgres".into(),
            server_users: BTreeMap::new(),
        }
    }
}

impl ProcessConfig {
    /// Whether the operator chose to keep the proxy root.
    pub fn stays_root(&self) -> bool {
        self.user == "root"
    }

    /// The user the branch servers of `source` run as.
    pub fn server_user_for(&self, source: &str) -> &str {
        self.server_users
            .get(source)
            .map_or(self.server_user.as_str(), String::as_str)
    }

    /// Every user branch servers may run as: `server_user`, then the sources' own.
    pub fn all_server_users(&self) -> Vec<&str> {
        let mut all = vec![self.server_user.as_str()];
        for u in self.server_users.values() {
            if !all.contains(&u.as_str()) {
                all.push(u);
            }
        }
        all
    }

    pub(super) fn validate(
        &self,
        sources: &BTreeMap<SourceName, SourceConfig>,
    ) -> Result<(), ConfigError> {
        let mut names = vec![
            ("process.user".to_owned(), &self.user),
            ("process.server_user".to_owned(), &self.server_user),
        ];
        for (source, user) in &self.server_users {
            let key = format!("process.server_users.{source}");
            match sources.iter().find(|(n, _)| n.as_str() == source) {
                Some((_, s)) if matches!(s.engine, EngineConfig::Instance(_)) => {}
                Some(_) => {
                    return Err(invalid(
                        key,
                        "only an `instance` source runs servers of its own",
                    ))
                }
                None => return Err(invalid(key, format!("there is no source {source:?}"))),
            }
            names.push((key, user));
        }
        for (key, name) in names {
            if name.is_empty() || name.contains(['/', ':', '\0']) || name.trim() != name {
                return Err(invalid(key, format!("{name:?} is not a user name")));
            }
        }
        let servers = std::iter::once(("process.server_user".to_owned(), &self.server_user)).chain(
            self.server_users
                .iter()
                .map(|(s, u)| (format!("process.server_users.{s}"), u)),
        );
        for (key, name) in servers {
            if name == "root" {
                return Err(invalid(
                    key,
                    "PostgreSQL refuses to run as root; name an unprivileged user (default postgres)",
                ));
            }
            if *name == self.user {
                return Err(invalid(
                    key,
                    format!(
                        "must differ from process.user ({:?}): the servers' user must not reach \
                         the proxy's keys and records",
                        self.user
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn error(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn users_are_checked_and_name_their_key() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(
            (cfg.process.user.as_str(), cfg.process.server_user.as_str()),
            ("offshoot", "postgres")
        );
        let e = error("[process]\nuser = \"postgres\"\n");
        assert!(
            e.contains("process.server_user") && e.contains("differ"),
            "{e}"
        );
        let e = error("[process]\nserver_user = \"root\"\n");
        assert!(
            e.contains("process.server_user") && e.contains("root"),
            "{e}"
        );
        let e = error("[process]\nuser = \"a/b\"\n");
        assert!(e.contains("process.user"), "{e}");
        let e = error("[process.server_users]\nnope = \"pg_nope\"\n");
        assert!(e.contains("process.server_users.nope"), "{e}");
        let e = error(
            "[sources.shop]\nserver = \"host=db\"\n[process.server_users]\nshop = \"pg_shop\"\n",
        );
        assert!(e.contains("instance"), "{e}");
        let cfg = Config::from_toml(
            "[sources.full]\nengine = \"instance\"\nupstream = \"host=db\"\n\
             [process.server_users]\nfull = \"pg_full\"\n",
        )
        .unwrap();
        assert_eq!(cfg.process.server_user_for("full"), "pg_full");
        assert_eq!(cfg.process.server_user_for("other"), "postgres");
        assert_eq!(cfg.process.all_server_users(), ["postgres", "pg_full"]);
    }
}
