//! `[process]`: the OS users the proxy and its branch servers run as when the proxy
//! is started as root (see `privsep`). Started as any other user, none of this
//! applies: the proxy and its servers run as that user.

use serde::Deserialize;

use super::keys::invalid;
use super::ConfigError;

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
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            user: "offshoot".into(),
            server_user: "postgres".into(),
        }
    }
}

impl ProcessConfig {
    /// Whether the operator chose to keep the proxy root.
    pub fn stays_root(&self) -> bool {
        self.user == "root"
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, name) in [
            ("process.user", &self.user),
            ("process.server_user", &self.server_user),
        ] {
            if name.is_empty() || name.contains(['/', ':', '\0']) || name.trim() != name {
                return Err(invalid(key, format!("{name:?} is not a user name")));
            }
        }
        if self.server_user == "root" {
            return Err(invalid(
                "process.server_user",
                "PostgreSQL refuses to run as root; name an unprivileged user (default postgres)",
            ));
        }
        if self.server_user == self.user {
            return Err(invalid(
                "process.server_user",
                format!(
                    "must differ from process.user ({:?}): the servers' user must not reach the \
                     proxy's keys and records",
                    self.user
                ),
            ));
        }
        Ok(())
    }
}
