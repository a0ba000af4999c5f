//! The registry's own logic, on the fake engine and a manual clock: no test here
//! sleeps. Slow engine steps are held at gates, so each test looks at the registry
//! exactly mid-flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::fake::{clock, id, registry, registry_on, FakeEngine};
use super::*;
use crate::branch::engine::CopyMode;
use crate::branch::store::{RecordState, Store};
use crate::config::{EngineConfig, InstanceConfig, SourceConfig};
use crate::error::EngineError;
use crate::error::ProvisionError;

const WAIT: Duration = Duration::from_secs(5);

fn phase(reg: &Registry, b: &str) -> Phase {
    reg.view(&id(b)).expect("branch exists").state
}

fn with_servers() -> FakeEngine {
    FakeEngine {
        servers: true,
        ..Default::default()
    }
}

/// The `offshoot_branches{source="shop"}` gauges, in `Phase::ALL` order.
fn gauges(reg: &Registry) -> [i64; 5] {
    Phase::ALL.map(|p| {
        reg.metrics
            .branches
            .with_label_values(&["shop", p.as_str()])
            .get()
    })
}

fn spawn_acquire(
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
async fn creation_starts_the_server_and_suspension_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let lease = reg.acquire(&id("a"), WAIT).await.unwrap();
    assert_eq!(phase(&reg, "a"), Phase::Ready);
    assert_eq!(engine.starts.load(Ordering::SeqCst), 1);
    let view = reg.view(&id("a")).unwrap();
    assert_eq!(view.snapshot.as_deref(), Some("s1"));
    assert_eq!(view.copy_mode, Some(CopyMode::Copy));
    // Never while a connection is open.
    assert!(!reg.suspend(&id("a")).await.unwrap());
    drop(lease);
    assert!(reg.suspend(&id("a")).await.unwrap());
    assert_eq!(phase(&reg, "a"), Phase::Suspended);
    assert!(engine.running.lock().unwrap().is_empty());
    // Suspending twice is a no-op.
    assert!(!reg.suspend(&id("a")).await.unwrap());
    assert_eq!(engine.stops.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn gauges_follow_every_transition() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    assert_eq!(gauges(&reg), [0; 5]);

    // [provisioning, starting, ready, suspended, expiring]
    engine.create_gate.close();
    engine.start_gate.close();
    let conn = spawn_acquire(&reg, "a");
    engine.create_gate.reached().await;
    assert_eq!(gauges(&reg), [1, 0, 0, 0, 0]);
    engine.create_gate.open();
    engine.start_gate.reached().await;
    assert_eq!(gauges(&reg), [0, 1, 0, 0, 0]);
    engine.start_gate.open();
    conn.await.unwrap().unwrap();
    assert_eq!(gauges(&reg), [0, 0, 1, 0, 0]);

    // Stopping already shows as suspended, as the API does.
    engine.stop_gate.close();
    let suspension = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.suspend(&id("a")).await })
    };
    engine.stop_gate.reached().await;
    assert_eq!(phase(&reg, "a"), Phase::Suspended);
    assert_eq!(gauges(&reg), [0, 0, 0, 1, 0]);
    engine.stop_gate.open();
    assert!(suspension.await.unwrap().unwrap());
    assert_eq!(gauges(&reg), [0, 0, 0, 1, 0]);

    engine.destroy_gate.close();
    let deletion = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.delete(&id("a"), false, RemoveReason::Api).await })
    };
    engine.destroy_gate.reached().await;
    assert_eq!(gauges(&reg), [0, 0, 0, 0, 1]);
    engine.destroy_gate.open();
    deletion.await.unwrap().unwrap();
    assert_eq!(gauges(&reg), [0; 5]);
}

#[tokio::test]
async fn a_suspension_whose_request_is_dropped_still_ends() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    engine.stop_gate.close();
    let request = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.suspend(&id("a")).await })
    };
    engine.stop_gate.reached().await;
    // The client hangs up: its request is dropped mid-stop.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    engine.stop_gate.open();
    // The next connection waits for the stop, then starts the server again.
    reg.acquire(&id("a"), WAIT).await.map(drop).unwrap();
    assert_eq!(phase(&reg, "a"), Phase::Ready);
    assert_eq!(engine.stops.load(Ordering::SeqCst), 1);
    assert_eq!(engine.starts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_resumed_branch_is_not_idle_before_its_waiters_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let config = SourceConfig {
        engine: EngineConfig::Instance(InstanceConfig {
            suspend_after: Some(Duration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let clock = clock();
    let reg = registry_on(engine.clone(), config, dir.path(), clock.clone());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    reg.suspend(&id("a")).await.unwrap();
    clock.advance(Duration::from_secs(600));
    // A connection wakes the branch but gives up before the server is up.
    engine.start_gate.close();
    let Err(ProvisionError::Timeout(_)) = reg.acquire(&id("a"), Duration::ZERO).await else {
        panic!("should time out")
    };
    engine.start_gate.open();
    while phase(&reg, "a") != Phase::Ready {
        tokio::task::yield_now().await;
    }
    // Just started: not a candidate for suspension, whatever its last session.
    assert!(reg.suspend_candidates(clock.now()).is_empty());
    clock.advance(Duration::from_secs(60));
    assert_eq!(reg.suspend_candidates(clock.now()).len(), 1);
}

#[tokio::test]
async fn a_dead_server_is_noticed_and_started_by_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    // A live server is left alone.
    assert!(!reg.server_lost(&id("a")).await);
    assert_eq!(phase(&reg, "a"), Phase::Ready);
    // The server dies.
    engine.running.lock().unwrap().clear();
    assert!(reg.server_lost(&id("a")).await);
    assert_eq!(phase(&reg, "a"), Phase::Suspended);
    assert_eq!(gauges(&reg), [0, 0, 0, 1, 0]);
    assert!(!reg.server_lost(&id("a")).await, "noticed once");
    reg.acquire(&id("a"), WAIT).await.map(drop).unwrap();
    assert_eq!(phase(&reg, "a"), Phase::Ready);
    assert_eq!(engine.starts.load(Ordering::SeqCst), 2);
    assert!(engine.running.lock().unwrap().contains("shop__a"));
}

#[tokio::test]
async fn concurrent_connections_to_a_suspended_branch_share_one_start() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    reg.suspend(&id("a")).await.unwrap();
    engine.start_gate.close();
    let tasks: Vec<_> = (0..10).map(|_| spawn_acquire(&reg, "a")).collect();
    engine.start_gate.reached().await;
    assert_eq!(phase(&reg, "a"), Phase::Starting);
    engine.start_gate.open();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        engine.starts.load(Ordering::SeqCst),
        2,
        "create + one resume"
    );
    assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
    assert_eq!(phase(&reg, "a"), Phase::Ready);
}

#[tokio::test]
async fn a_failed_resume_reaches_the_waiters_and_keeps_the_branch_suspended() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    reg.suspend(&id("a")).await.unwrap();
    *engine.fail_start.lock().unwrap() = Some("bad setting".into());
    let Err(e) = reg.acquire(&id("a"), WAIT).await else {
        panic!("start should fail")
    };
    assert!(matches!(e, ProvisionError::Start { .. }), "{e}");
    assert!(e.to_string().contains("bad setting"), "{e}");
    assert_eq!(phase(&reg, "a"), Phase::Suspended);
    *engine.fail_start.lock().unwrap() = None;
    reg.acquire(&id("a"), WAIT).await.map(drop).unwrap();
    assert_eq!(phase(&reg, "a"), Phase::Ready);
}

#[tokio::test]
async fn a_failed_first_start_removes_the_clone_and_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    *engine.fail_start.lock().unwrap() = Some("bad setting".into());
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    let Err(e) = reg.acquire(&id("a"), WAIT).await else {
        panic!("start should fail")
    };
    assert!(e.to_string().contains("bad setting"), "{e}");
    assert!(reg.list().is_empty());
    assert!(engine.clones.lock().unwrap().is_empty());
    let store = Store::open(dir.path()).unwrap();
    assert!(store.load_all().unwrap().0.is_empty());
    assert_eq!(gauges(&reg), [0; 5]);
}

#[tokio::test]
async fn suspended_branches_expire_but_persistent_ones_only_suspend() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let config = SourceConfig {
        idle_expire: Some(Duration::from_secs(600)),
        persistent: vec![crate::names::BranchName::new("qa").unwrap()],
        engine: EngineConfig::Instance(InstanceConfig {
            suspend_after: Some(Duration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let clock = clock();
    let reg = registry_on(engine.clone(), config, dir.path(), clock.clone());
    for b in ["a", "qa"] {
        drop(reg.acquire(&id(b), WAIT).await.unwrap());
    }
    clock.advance(Duration::from_secs(59));
    assert!(reg.suspend_candidates(clock.now()).is_empty());
    clock.advance(Duration::from_secs(2));
    let mut ids: Vec<_> = reg
        .suspend_candidates(clock.now())
        .into_iter()
        .map(|(id, idle)| {
            assert_eq!(idle, Duration::from_secs(61));
            id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![id("a"), id("qa")]);
    for i in &ids {
        assert!(reg.suspend(i).await.unwrap());
    }
    assert!(reg.idle_candidates(clock.now()).is_empty());
    clock.advance(Duration::from_secs(540));
    let expiring: Vec<_> = reg
        .idle_candidates(clock.now())
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(expiring, vec![id("a")]);
    reg.delete(&id("a"), false, RemoveReason::Idle)
        .await
        .unwrap();
    assert_eq!(phase(&reg, "qa"), Phase::Suspended);
    assert_eq!(reg.list().len(), 1);
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

#[tokio::test]
async fn a_restart_finds_running_and_stopped_servers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    {
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        drop(reg.acquire(&id("up"), WAIT).await.unwrap());
        drop(reg.acquire(&id("down"), WAIT).await.unwrap());
        reg.suspend(&id("down")).await.unwrap();
    }
    let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
    reg.adopt().await.unwrap();
    assert_eq!(phase(&reg, "up"), Phase::Ready);
    assert_eq!(phase(&reg, "down"), Phase::Suspended);
    assert_eq!(gauges(&reg), [0, 0, 1, 1, 0]);
    let view = reg.view(&id("down")).unwrap();
    assert_eq!(view.snapshot.as_deref(), Some("s1"));
    reg.acquire(&id("down"), WAIT).await.map(drop).unwrap();
    assert_eq!(phase(&reg, "down"), Phase::Ready);
}

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
