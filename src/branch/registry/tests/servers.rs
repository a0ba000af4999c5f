//! Engines that run a server per clone: start, suspension, resume, expiry of
//! suspended branches, a server that dies.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{gauges, phase, spawn_acquire, with_servers, WAIT};
use crate::branch::engine::CopyMode;
use crate::branch::registry::fake::{clock, id, registry, registry_on};
use crate::branch::registry::{Phase, RemoveReason};
use crate::branch::store::Store;
use crate::config::{EngineConfig, InstanceConfig, SourceConfig};
use crate::error::ProvisionError;
/// An `instance` source whose branch servers are stopped after `secs` unused.
fn suspends_after(secs: u64) -> SourceConfig {
    SourceConfig {
        engine: EngineConfig::Instance(InstanceConfig {
            suspend_after: Some(Duration::from_secs(secs)),
            ..Default::default()
        }),
        ..Default::default()
    }
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
    let config = suspends_after(60);
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
        ..suspends_after(60)
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
    assert!(reg.expiry_candidates(clock.now()).is_empty());
    clock.advance(Duration::from_secs(540));
    let expiring: Vec<_> = reg
        .expiry_candidates(clock.now())
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(expiring, vec![id("a")]);
    reg.delete(&id("a"), false, RemoveReason::Idle)
        .await
        .unwrap();
    assert_eq!(phase(&reg, "qa"), Phase::Suspended);
    assert_eq!(reg.list().len(), 1);
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
