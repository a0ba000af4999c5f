//! The checks of a source's snapshot keys: the schedule (`snapshot_every`,
//! `snapshot_at`, `keep_snapshots`), `snapshot_transform` and `max_total_size`.

use std::time::Duration;

use super::keys::invalid;
use super::{ConfigError, SourceConfig};

/// Scheduled snapshots closer together than this would leave the source no rest.
const MIN_SNAPSHOT_EVERY: Duration = Duration::from_secs(60);

impl SourceConfig {
    pub(super) fn validate_snapshots(
        &self,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        if let Some(every) = self.snapshot_every {
            if every < MIN_SNAPSHOT_EVERY {
                return Err(invalid(key("snapshot_every"), "must be at least 1m"));
            }
        }
        if self.snapshot_at.is_some() && self.snapshot_every.is_none() {
            return Err(invalid(
                key("snapshot_at"),
                "aligns scheduled snapshots, so it needs `snapshot_every` (e.g. \"24h\")",
            ));
        }
        if self.keep_snapshots == Some(0) {
            return Err(invalid(
                key("keep_snapshots"),
                "must be at least 1 (unset keeps every snapshot)",
            ));
        }
        for (i, path) in self.snapshot_transform.iter().enumerate() {
            if !path.is_file() {
                return Err(invalid(
                    key(&format!("snapshot_transform[{i}]")),
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.max_total_size.is_some_and(|s| s.bytes() == 0) {
            return Err(invalid(key("max_total_size"), "must be greater than zero"));
        }
        Ok(())
    }
}
