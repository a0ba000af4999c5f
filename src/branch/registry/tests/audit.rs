//! What the registry records in the audit trail, and whom it names: each
//! transition once, on the manual clock.

use std::sync::Arc;
use std::time::Duration;

use super::super::fake::{clock, id, FakeEngine};
use super::super::*;
use super::{with_servers, WAIT};
use crate::audit::{Action, ActorKind, Audit, Filter, Outcome, Rotation, Webhooks};
use crate::branch::reaper::reap_once;
use crate::branch::store::Store;
use crate::config::{EngineConfig, InstanceConfig, SourceConfig};

fn audited(engine: Arc<FakeEngine>, config: SourceConfig, dir: &std::path::Path) -> Arc<Registry> {
    let clock = clock();
    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(
        dir,
        Rotation::default(),
        Webhooks::default(),
        clock.clone(),
        metrics.clone(),
    )
    .unwrap();
    let source = Source::new(SourceName::new("shop").unwrap(), config, engine);
    Arc::new(
        Registry::new(vec![source], Store::open(dir).unwrap(), metrics, clock).with_audit(audit),
    )
}

/// Every event so far, oldest first.
async fn trail(reg: &Registry) -> Vec<crate::audit::Event> {
    let mut all = reg
        .audit()
        .query(Filter {
            limit: 1000,
            ..Filter::default()
        })
        .await
        .unwrap();
    all.reverse();
    all
}

#[tokio::test]
async fn creation_refusal_failure_and_expiry_are_each_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    let config = SourceConfig {
        idle_expire: Some(Duration::from_secs(60)),
        max_branches: 1,
        ..Default::default()
    };
    let reg = audited(engine.clone(), config, dir.path());
    let creator = Creator {
        role: "app".into(),
        may_create: true,
        max_branches: 0,
    };
    drop(
        reg.acquire_as(&id("a"), WAIT, Some(&creator))
            .await
            .unwrap(),
    );
    // Connecting again creates nothing.
    drop(
        reg.acquire_as(&id("a"), WAIT, Some(&creator))
            .await
            .unwrap(),
    );
    let Err(err) = reg.acquire_as(&id("b"), WAIT, Some(&creator)).await else {
        panic!("over max_branches");
    };
    assert!(matches!(err, ProvisionError::Quota { .. }), "{err}");

    reg.clock().advance(Duration::from_secs(61));
    reap_once(&reg, reg.clock().now()).await;
    *engine.fail_with.lock().unwrap() = Some("the disk is on fire".into());
    let opts = CreateOptions::default();
    reg.ensure(&id("c"), &opts, WAIT).await.unwrap_err();

    let events = trail(&reg).await;
    let summary: Vec<(Action, &str, ActorKind, Outcome)> = events
        .iter()
        .map(|e| {
            (
                e.action,
                e.branch.as_deref().unwrap(),
                e.actor.kind,
                e.outcome,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (Action::BranchCreated, "a", ActorKind::Client, Outcome::Ok),
            (
                Action::BranchRefused,
                "b",
                ActorKind::Client,
                Outcome::Refused
            ),
            (Action::BranchExpired, "a", ActorKind::Reaper, Outcome::Ok),
            (
                Action::BranchCreateFailed,
                "c",
                ActorKind::Api,
                Outcome::Failed
            ),
        ]
    );
    assert_eq!(events[0].actor.role.as_deref(), Some("app"));
    assert_eq!(events[1].reason.as_deref(), Some("quota (max_branches 1)"));
    assert_eq!(events[2].reason.as_deref(), Some("idle 1m"));
    // The manual clock's time, 61 s after the creation.
    assert_eq!(
        events[2].at.duration_since(events[0].at).unwrap(),
        Duration::from_secs(61)
    );
    let error = events[3].error.as_deref().unwrap();
    assert!(error.contains("the disk is on fire"), "{error}");
}

#[tokio::test]
async fn suspension_resume_and_deletion_name_their_actor() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(with_servers());
    let config = SourceConfig {
        engine: EngineConfig::Instance(InstanceConfig {
            suspend_after: Some(Duration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let reg = audited(engine, config, dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    reg.clock().advance(Duration::from_secs(60));
    reap_once(&reg, reg.clock().now()).await;
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    let api = crate::audit::Actor::api(Some("127.0.0.1:1".into()), Some("admin".into()));
    assert!(reg.suspend_by(&id("a"), api.clone()).await.unwrap());
    reg.delete_by(&id("a"), false, RemoveReason::Api, api.clone())
        .await
        .unwrap();

    let events = trail(&reg).await;
    let actions: Vec<Action> = events.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            Action::BranchCreated,
            Action::BranchSuspended,
            Action::BranchResumed,
            Action::BranchSuspended,
            Action::BranchDeleted,
        ]
    );
    assert_eq!(events[1].actor.kind, ActorKind::Reaper);
    assert_eq!(events[1].reason.as_deref(), Some("idle 1m"));
    assert_eq!(events[2].actor.kind, ActorKind::Client);
    assert_eq!(events[3].actor, api);
    assert_eq!(events[3].reason, None);
    assert_eq!(events[4].actor, api);
}
