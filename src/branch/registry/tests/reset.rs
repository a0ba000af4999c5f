//! Resets on the fake engine: refusal while in use, a forced reset ending the
//! sessions, connections waiting through a reset, and both ways a reset can fail.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{phase, spawn_acquire, with_servers, WAIT};
use crate::branch::registry::fake::{id, registry, FakeEngine};
use crate::branch::registry::{Phase, ResetError};
use crate::config::SourceConfig;

fn engine_with(snapshots: &[&str], servers: bool) -> Arc<FakeEngine> {
    let e = if servers {
        with_servers()
    } else {
        FakeEngine::default()
    };
    e.snapshots
        .lock()
        .unwrap()
        .extend(snapshots.iter().map(|s| s.to_string()));
    Arc::new(e)
}

#[tokio::test]
async fn reset_takes_the_newest_snapshot_and_restarts_the_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(&["s1"], true);
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("qa"), WAIT).await.unwrap());
    let before = reg.lock().branches[&id("qa")].record.clone();
    assert_eq!(before.born_at(), before.created_at);
    engine.snapshots.lock().unwrap().insert("s2".into());
    reg.clock().advance(std::time::Duration::from_secs(60));
    reg.reset(&id("qa"), None, false, api()).await.unwrap();
    let after = reg.lock().branches[&id("qa")].record.clone();
    assert_eq!(after.snapshot.as_deref(), Some("s2"));
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.born_at(), before.created_at + 60_000);
    assert_eq!(phase(&reg, "qa"), Phase::Ready);
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
    let ok = reg.metrics.resets_total.with_label_values(&["shop", "ok"]);
    assert_eq!(ok.get(), 1);
    // A named snapshot that does not exist changes nothing.
    let err = reg
        .reset(&id("qa"), Some("nope".into()), false, api())
        .await
        .unwrap_err();
    assert!(matches!(err, ResetError::Snapshot(_)), "{err}");
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
    reg.reset(&id("qa"), Some("s1".into()), false, api())
        .await
        .unwrap();
    assert_eq!(reg.view(&id("qa")).unwrap().snapshot.as_deref(), Some("s1"));
    assert!(matches!(
        reg.reset(&id("nobody"), None, false, api()).await,
        Err(ResetError::NotFound(_))
    ));
}

#[tokio::test]
async fn open_sessions_refuse_a_reset_unless_forced_which_ends_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(&["s1"], false);
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let lease = reg.acquire(&id("qa"), WAIT).await.unwrap();
    match reg.reset(&id("qa"), None, false, api()).await {
        Err(ResetError::InUse { conns: 1, .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
    // Forced: the session is told to end; it leaves when it has told its client.
    engine.create_gate.close();
    let r = {
        let (reg, id) = (reg.clone(), id("qa"));
        tokio::spawn(async move { reg.reset(&id, None, true, api()).await })
    };
    tokio::time::timeout(WAIT, lease.guard.ended())
        .await
        .expect("the session was told to end");
    assert_eq!(lease.guard.branch(), &id("qa"));
    drop(lease);
    // A connection arriving during the reset waits for the new clone.
    engine.create_gate.reached().await;
    assert_eq!(phase(&reg, "qa"), Phase::Provisioning);
    let waiting = spawn_acquire(&reg, "qa");
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    engine.create_gate.open();
    r.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    // Sessions leased after the reset are not ended by it.
    let fresh = reg.acquire(&id("qa"), WAIT).await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(20), fresh.guard.ended())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_reset_whose_new_clone_fails_removes_the_branch() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(&[], false);
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("qa"), WAIT).await.unwrap());
    *engine.fail_with.lock().unwrap() = Some("disk full".into());
    let err = reg.reset(&id("qa"), None, false, api()).await.unwrap_err();
    assert!(matches!(err, ResetError::Failed { .. }), "{err}");
    assert!(reg.view(&id("qa")).is_none());
    assert!(engine.clones.lock().unwrap().is_empty());
    let (records, _) = reg.store.load_all().unwrap();
    assert!(records.is_empty());
    let failed = reg
        .metrics
        .resets_total
        .with_label_values(&["shop", "failed"]);
    assert_eq!(failed.get(), 1);
}

#[tokio::test]
async fn a_branch_in_flight_is_busy_for_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(&[], true);
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("qa"), WAIT).await.unwrap());
    engine.destroy_gate.close();
    let r = {
        let (reg, id) = (reg.clone(), id("qa"));
        tokio::spawn(async move { reg.reset(&id, None, false, api()).await })
    };
    engine.destroy_gate.reached().await;
    assert!(matches!(
        reg.reset(&id("qa"), None, false, api()).await,
        Err(ResetError::Busy(_))
    ));
    assert!(matches!(
        reg.delete(&id("qa"), true, crate::branch::RemoveReason::Api)
            .await,
        Err(crate::branch::DeleteError::Busy(_))
    ));
    engine.destroy_gate.open();
    r.await.unwrap().unwrap();
    assert_eq!(phase(&reg, "qa"), Phase::Ready);
    assert_eq!(engine.running.lock().unwrap().len(), 1);
}

fn api() -> crate::audit::Actor {
    crate::audit::Actor::api(None, None)
}
