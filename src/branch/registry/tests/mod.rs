//! The registry's own logic, on the fake engine and a manual clock: no test here
//! sleeps. Slow engine steps are held at gates, so each test looks at the registry
//! exactly mid-flight.
//!
//! `servers`: engines with a server per clone (start, suspension, resume, a dead
//! server); `snapshots`: snapshot deletion against creations.

mod audit;
mod policies;
mod reset;
mod servers;
mod snapshots;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::fake::{clock, id, registry, registry_on, FakeEngine};
use super::*;
use crate::branch::store::{RecordState, Store};
use crate::config::SourceConfig;
use crate::error::ProvisionError;

pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) fn phase(reg: &Registry, b: &str) -> Phase {
    reg.view(&id(b)).expect("branch exists").state
}

pub(super) fn with_servers() -> FakeEngine {
    FakeEngine {
        servers: true,
        ..Default::default()
    }
}

/// The `offshoot_branches{source="shop"}` gauges, in `Phase::ALL` order.
pub(super) fn gauges(reg: &Registry) -> [i64; 5] {
    Phase::ALL.map(|p| {
        reg.metrics
            .branches
            .with_label_values(&["shop", p.as_str()])
            .get()
    })
}

pub(super) fn spawn_acquire(
    reg: &Arc<Registry>,
    b: &str,
) -> tokio::task::JoinHandle<Result<(), ProvisionError>> {
    let (reg, id) = (reg.clone(), id(b));
    tokio::spawn(async move { reg.acquire(&id, WAIT).await.map(drop) })
}

#[tokio::test]
async fn concurrent_acquires_share_one_creation() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    engine.create_gate.close();
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let tasks: Vec<_> = (0..20).map(|_| spawn_acquire(&reg, "a")).collect();
    // The creation task is spawned by the first acquire, so it runs after all 20
    // have looked: every one of them is waiting on it.
    engine.create_gate.reached().await;
    assert_eq!(phase(&reg, "a"), Phase::Provisioning);
    engine.create_gate.open();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
    assert_eq!(reg.list().len(), 1);
    assert_eq!(reg.list()[0].state, Phase::Ready);
}

#[tokio::test]
async fn failures_reach_every_waiter_and_leave_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    *engine.fail_with.lock().unwrap() = Some("disk full".into());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let x = id("x");
    let (a, b) = tokio::join!(reg.acquire(&x, WAIT), reg.acquire(&x, WAIT));
    for r in [a, b] {
        let Err(e) = r else { panic!("should fail") };
        assert!(e.to_string().contains("disk full"), "{e}");
    }
    assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
    assert!(reg.list().is_empty());
    assert_eq!(gauges(&reg), [0; 5]);
    assert!(Store::open(dir.path())
        .unwrap()
        .load_all()
        .unwrap()
        .0
        .is_empty());
    // The next attempt tries again.
    *engine.fail_with.lock().unwrap() = None;
    reg.acquire(&x, WAIT).await.map(drop).unwrap();
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_creation_that_dies_is_reported_and_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    engine.panic_create.store(true, Ordering::SeqCst);
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let Err(e) = reg.acquire(&id("x"), WAIT).await else {
        panic!("the creation died")
    };
    assert!(e.to_string().contains("interrupted"), "{e}");
    assert!(reg.list().is_empty());
    assert_eq!(gauges(&reg), [0; 5]);
    // The next connection starts afresh.
    reg.acquire(&id("x"), WAIT).await.map(drop).unwrap();
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn quota_counts_every_branch_of_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let config = SourceConfig {
        max_branches: 2,
        ..Default::default()
    };
    let reg = registry(engine, config, dir.path());
    reg.acquire(&id("a"), WAIT).await.map(drop).unwrap();
    reg.acquire(&id("b"), WAIT).await.map(drop).unwrap();
    let Err(e) = reg.acquire(&id("c"), WAIT).await else {
        panic!("over quota")
    };
    assert!(matches!(e, ProvisionError::Quota { limit: 2, .. }), "{e}");
    // Existing branches are still served.
    reg.acquire(&id("a"), WAIT).await.map(drop).unwrap();
}

#[tokio::test]
async fn a_role_creates_only_when_allowed_and_within_its_own_quota() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let role = |name: &str, may_create, max_branches| Creator {
        role: name.into(),
        may_create,
        max_branches,
    };
    let reader = role("reader", false, 0);
    let Err(e) = reg.acquire_as(&id("r"), WAIT, Some(&reader)).await else {
        panic!("reader may not create")
    };
    assert!(matches!(e, ProvisionError::CreateForbidden { .. }), "{e}");
    assert!(reg.list().is_empty());

    let dev = role("dev", true, 1);
    reg.acquire_as(&id("d1"), WAIT, Some(&dev))
        .await
        .map(drop)
        .unwrap();
    assert_eq!(
        reg.view(&id("d1")).unwrap().created_by.as_deref(),
        Some("dev")
    );
    let Err(e) = reg.acquire_as(&id("d2"), WAIT, Some(&dev)).await else {
        panic!("dev is at its quota")
    };
    assert!(
        matches!(e, ProvisionError::RoleQuota { limit: 1, .. }),
        "{e}"
    );
    // Branches made by others do not count against the role, and a role that may
    // not create is still served an existing branch.
    reg.acquire_as(&id("ops"), WAIT, Some(&role("ops", true, 1)))
        .await
        .map(drop)
        .unwrap();
    reg.acquire_as(&id("d1"), WAIT, Some(&reader))
        .await
        .map(drop)
        .unwrap();
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn deletion_waits_for_connections_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let lease = reg.acquire(&id("d"), WAIT).await.unwrap();
    let err = reg
        .delete(&id("d"), false, RemoveReason::Api)
        .await
        .unwrap_err();
    assert!(matches!(err, DeleteError::InUse { conns: 1, .. }), "{err}");
    drop(lease);
    reg.delete(&id("d"), false, RemoveReason::Api)
        .await
        .unwrap();
    assert!(engine.clones.lock().unwrap().is_empty());
    let _lease = reg.acquire(&id("d"), WAIT).await.unwrap();
    reg.delete(&id("d"), true, RemoveReason::Api).await.unwrap();
    assert!(reg.list().is_empty());
}

#[tokio::test]
async fn a_connection_during_a_deletion_waits_then_gets_a_fresh_clone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let clock = clock();
    let reg = registry_on(
        engine.clone(),
        SourceConfig::default(),
        dir.path(),
        clock.clone(),
    );
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    let first = reg.view(&id("a")).unwrap().created_at;

    engine.destroy_gate.close();
    let deletion = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.delete(&id("a"), false, RemoveReason::Api).await })
    };
    engine.destroy_gate.reached().await;
    assert_eq!(phase(&reg, "a"), Phase::Expiring);
    clock.advance(Duration::from_secs(60));

    let conn = spawn_acquire(&reg, "a");
    tokio::task::yield_now().await;
    assert!(
        !conn.is_finished(),
        "granted a branch that is being deleted"
    );
    assert_eq!(engine.creates.load(Ordering::SeqCst), 1);

    engine.destroy_gate.open();
    deletion.await.unwrap().unwrap();
    conn.await.unwrap().unwrap();
    assert_eq!(engine.creates.load(Ordering::SeqCst), 2, "a fresh clone");
    let view = reg.view(&id("a")).unwrap();
    assert_eq!(view.state, Phase::Ready);
    assert_ne!(view.created_at, first, "never the deleted clone");
    assert_eq!(view.created_at, "2023-11-14T22:14:20.000Z");
    assert!(engine.clones.lock().unwrap().contains("shop__a"));
}

#[tokio::test]
async fn a_restart_adopts_ready_and_settles_provisioning_records() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    {
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        reg.acquire(&id("kept"), WAIT).await.map(drop).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let mut rec = store.load_all().unwrap().0.remove(0);
    rec.branch = BranchName::new("lost").unwrap();
    rec.clone_name = "shop__lost".into();
    rec.state = RecordState::Provisioning;
    store.save(&rec).unwrap();

    let reg = registry(engine, SourceConfig::default(), dir.path());
    reg.adopt().await.unwrap();
    let names: Vec<String> = reg.list().into_iter().map(|b| b.branch).collect();
    assert_eq!(names, vec!["kept".to_string()]);
    assert_eq!(store.load_all().unwrap().0.len(), 1);
    assert_eq!(gauges(&reg), [0, 0, 1, 0, 0]);
}

#[tokio::test]
async fn activity_is_stamped_from_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let clock = clock();
    let reg = registry_on(engine, SourceConfig::default(), dir.path(), clock.clone());
    let lease = reg.acquire(&id("a"), WAIT).await.unwrap();
    let view = reg.view(&id("a")).unwrap();
    assert_eq!(view.created_at, "2023-11-14T22:13:20.000Z");
    assert_eq!(view.last_active, "2023-11-14T22:13:20.000Z");
    clock.advance(Duration::from_millis(90_500));
    drop(lease);
    assert_eq!(
        reg.view(&id("a")).unwrap().last_active,
        "2023-11-14T22:14:50.500Z"
    );
    // And saved, so a restart keeps it.
    reg.flush_activity();
    let rec = Store::open(dir.path())
        .unwrap()
        .load_all()
        .unwrap()
        .0
        .remove(0);
    assert_eq!(rec.last_active, 1_700_000_090_500);
}
