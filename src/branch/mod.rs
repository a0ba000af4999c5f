//! The life of a branch: the registry owns state, engines make and remove clones, the
//! store keeps records across restarts, and the reaper expires idle branches.

pub mod engine;
pub mod reaper;
pub mod registry;
pub mod store;

pub use registry::{BranchView, DeleteError, Lease, Registry, RemoveReason, Source};
