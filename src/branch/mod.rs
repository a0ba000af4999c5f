//! The life of a branch: the registry owns state, engines make and remove clones, the
//! store keeps records across restarts, and the reaper suspends and expires idle
//! branches.

pub mod engine;
pub mod reaper;
pub mod registry;
pub mod schedule;
pub mod store;

pub use registry::{
    BranchView, Changes, CreateOptions, DeleteError, Due, Guard, IfExists, Lease, Phase, Registry,
    RemoveReason, ResetError, Source, UpdateError,
};
