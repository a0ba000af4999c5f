//! Snapshot deletion, decided by the registry under the lock that starts
//! creations.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{spawn_acquire, WAIT};
use crate::branch::registry::fake::{id, registry, FakeEngine};
use crate::branch::registry::{CreateOptions, RemoveReason};
use crate::config::SourceConfig;
use crate::error::EngineError;
fn with_snapshots(names: &[&str]) -> FakeEngine {
    let engine = FakeEngine::default();
    engine
        .snapshots
        .lock()
        .unwrap()
        .extend(names.iter().map(|s| s.to_string()));
    engine
}

#[tokio::test]
async fn a_snapshot_in_use_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_snapshots(&["s1", "s2"]));
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let shop = id("a").source;
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    assert_eq!(reg.view(&id("a")).unwrap().snapshot.as_deref(), Some("s2"));
    let err = reg.delete_snapshot(&shop, "s2").await.unwrap_err();
    assert!(
        matches!(&err, EngineError::SnapshotInUse { name, branches } if name == "s2" && branches == &["a"]),
        "{err}"
    );
    assert_eq!(
        engine.snapshot_deletes.load(Ordering::SeqCst),
        0,
        "engine not asked"
    );
    // An unused one goes; once its branch is gone, so does the other.
    reg.delete_snapshot(&shop, "s1").await.unwrap();
    reg.delete(&id("a"), false, RemoveReason::Api)
        .await
        .unwrap();
    reg.delete_snapshot(&shop, "s2").await.unwrap();
    assert!(engine.snapshots.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_creation_during_a_snapshot_deletion_waits_and_never_gets_that_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_snapshots(&["s1", "s2"]));
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    engine.snapshot_gate.close();
    let deletion = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.delete_snapshot(&id("x").source, "s2").await })
    };
    engine.snapshot_gate.reached().await;
    // The newest is being deleted: a creation that would take it waits.
    let conn = spawn_acquire(&reg, "a");
    tokio::task::yield_now().await;
    assert!(!conn.is_finished());
    assert!(reg.view(&id("a")).is_none(), "no creation started yet");
    // One that names another snapshot goes ahead.
    let opts = CreateOptions {
        snapshot: Some("s1".into()),
        ..Default::default()
    };
    reg.ensure(&id("b"), &opts, WAIT).await.unwrap();
    engine.snapshot_gate.open();
    deletion.await.unwrap().unwrap();
    conn.await.unwrap().unwrap();
    assert_eq!(reg.view(&id("a")).unwrap().snapshot.as_deref(), Some("s1"));
}

#[tokio::test]
async fn a_snapshot_deletion_waits_for_a_creation_that_may_pick_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_snapshots(&["s1", "s2"]));
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    engine.create_gate.close();
    let conn = spawn_acquire(&reg, "a");
    engine.create_gate.reached().await;
    let deletion = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.delete_snapshot(&id("x").source, "s2").await })
    };
    tokio::task::yield_now().await;
    assert!(!deletion.is_finished());
    engine.create_gate.open();
    conn.await.unwrap().unwrap();
    // The creation took s2, so the deletion is refused.
    let err = deletion.await.unwrap().unwrap_err();
    assert!(matches!(err, EngineError::SnapshotInUse { .. }), "{err}");
    assert_eq!(engine.snapshot_deletes.load(Ordering::SeqCst), 0);
    assert!(engine.snapshots.lock().unwrap().contains("s2"));
}
