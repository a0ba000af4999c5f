//! Branch sizes: asked of the engines in the background ([`Registry::refresh_sizes`],
//! called by the reaper's size loop) and cached, so neither the API nor a creation
//! waits for a size query, and `max_total_size` is checked against the cache under
//! the registry's lock.

use std::collections::BTreeMap;

use tracing::debug;

use super::{Book, Registry};
use crate::branch::engine::Usage;
use crate::names::{BranchId, SourceName};

/// The last known size of each branch.
pub(super) type Sizes = BTreeMap<BranchId, Usage>;

impl Registry {
    /// Asks each settled branch's engine for its size, one branch at a time, and
    /// caches the answers. Branches gone meanwhile are dropped from the cache.
    pub async fn refresh_sizes(&self) {
        let records: Vec<_> = {
            let book = self.lock();
            book.branches
                .values()
                .filter(|b| b.state().settled())
                .map(|b| b.record.clone())
                .collect()
        };
        let mut fresh = Sizes::new();
        for rec in records {
            let Some(source) = self.sources.get(&rec.source) else {
                continue;
            };
            match source.engine.usage(&rec).await {
                Ok(Some(u)) => {
                    fresh.insert(rec.id(), u);
                }
                Ok(None) => {}
                Err(e) => debug!(branch = %rec.id(), error = %e, "size unknown for now"),
            }
        }
        let book = self.lock();
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        // Keep an older answer for a branch whose engine did not answer this time.
        sizes.retain(|id, _| book.branches.contains_key(id));
        sizes.extend(fresh);
    }

    /// The cached size of `id`.
    pub(super) fn size_of(&self, id: &BranchId) -> Option<Usage> {
        self.sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    /// The bytes the branches of `source` in `book` hold together, as last
    /// measured (a branch deleted since is no longer counted).
    pub(super) fn total_size(&self, book: &Book, source: &SourceName) -> u64 {
        self.sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(id, _)| &id.source == source && book.branches.contains_key(*id))
            .map(|(_, u)| u.bytes)
            .sum()
    }
}
