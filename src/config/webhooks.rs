//! `[[webhooks]]`: HTTP endpoints that are sent the events of the audit trail.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::keys::invalid;
use super::ConfigError;

/// One receiver of events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where each event is POSTed as JSON (`http://` or `https://`).
    pub url: String,
    /// Which events it is sent, e.g. `["branch.created", "branch.expired"]`; `"*"`
    /// matches every event, `"branch.*"` every event of a kind. Empty: every event.
    #[serde(default)]
    pub events: Vec<String>,
    /// File holding the HMAC-SHA256 key each request is signed with (read at
    /// start). Unset: requests are not signed.
    pub secret_file: Option<PathBuf>,
    /// PEM file of the CAs an `https://` receiver's certificate is checked
    /// against. Unset: the system's CA bundle.
    pub ca_file: Option<PathBuf>,
    /// How long one delivery attempt may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WebhookConfig {
    /// Whether an event named `action` (`branch.created`) is sent to this hook.
    pub fn wants(&self, action: &str) -> bool {
        self.events.is_empty()
            || self.events.iter().any(|e| {
                e == "*"
                    || e == action
                    || e.strip_suffix(".*")
                        .is_some_and(|kind| action.split('.').next() == Some(kind))
            })
    }

    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |field: &str| format!("webhooks[{i}].{field}");
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) {
            return Err(invalid(
                key("url"),
                format!("{:?} is not an http:// or https:// URL", self.url),
            ));
        }
        for (j, e) in self.events.iter().enumerate() {
            let ok = e == "*"
                || e.split('.').count() == 2
                    && e.split('.').all(|part| {
                        !part.is_empty()
                            && (part == "*"
                                || part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    });
            if !ok {
                return Err(invalid(
                    format!("webhooks[{i}].events[{j}]"),
                    format!(
                        "{e:?} is not an event name such as \"branch.created\" or \"branch.*\""
                    ),
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(invalid(key("timeout"), "must be greater than zero"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(events: &[&str]) -> WebhookConfig {
        WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            secret_file: None,
            ca_file: None,
            timeout: default_timeout(),
        }
    }

    #[test]
    fn events_are_chosen_by_name_or_kind() {
        assert!(hook(&[]).wants("branch.created"));
        assert!(hook(&["*"]).wants("snapshot.taken"));
        assert!(hook(&["branch.*"]).wants("branch.expired"));
        assert!(!hook(&["branch.*"]).wants("snapshot.taken"));
        assert!(hook(&["branch.created"]).wants("branch.created"));
        assert!(!hook(&["branch.created"]).wants("branch.deleted"));
    }
}
