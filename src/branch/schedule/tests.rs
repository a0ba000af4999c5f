//! The schedule's step on the fake engine and a manual clock: no test here sleeps.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{first_due, Outcome, Schedule};
use crate::branch::registry::fake::{id, registry, FakeEngine};
use crate::config::{Glob, PolicyConfig, Refresh, SourceConfig, TimeOfDay};
use crate::names::SourceName;

const WAIT: Duration = Duration::from_secs(5);

fn on_snapshot(pattern: &str) -> PolicyConfig {
    PolicyConfig {
        pattern: Glob::new(pattern).unwrap(),
        idle_expire: None,
        suspend_after: None,
        max_lifetime: None,
        persistent: Some(true),
        protected: None,
        refresh: Some(Refresh::OnSnapshot),
        connect_roles: None,
        create_roles: None,
        max_branches: None,
    }
}

fn scheduled(every: &str, keep: Option<usize>) -> SourceConfig {
    SourceConfig {
        snapshot_every: Some(humantime::parse_duration(every).unwrap()),
        keep_snapshots: keep,
        policies: vec![on_snapshot("qa*")],
        ..SourceConfig::default()
    }
}

fn shop() -> SourceName {
    SourceName::new("shop").unwrap()
}

fn snapshot_of(reg: &crate::branch::Registry, b: &str) -> String {
    reg.view(&id(b)).unwrap().snapshot.unwrap()
}

#[test]
fn the_first_snapshot_is_due_at_the_first_aligned_moment() {
    let day = Duration::from_secs(24 * 3600);
    let midnight = UNIX_EPOCH + day * 20_000;
    let now = midnight + Duration::from_secs(5 * 3600); // 05:00
    let three: TimeOfDay = "03:00".parse().unwrap();
    // Daily at 03:00: tomorrow.
    let anchor = three.next_at_or_after(now);
    assert_eq!(
        first_due(anchor, day, now),
        midnight + day + Duration::from_secs(3 * 3600)
    );
    // Every 6 hours aligned to 03:00: 09:00 today.
    let six = Duration::from_secs(6 * 3600);
    assert_eq!(
        first_due(anchor, six, now),
        midnight + Duration::from_secs(9 * 3600)
    );
    // Exactly on a moment: that moment.
    assert_eq!(first_due(now, six, now), now);
}

#[tokio::test]
async fn a_scheduled_snapshot_refreshes_idle_qa_branches_while_a_busy_one_waits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    engine.snapshots.lock().unwrap().insert("s1".into());
    let reg = registry(engine.clone(), scheduled("24h", Some(1)), dir.path());
    let start = reg.clock().now();
    let schedule = Schedule::new(&reg, start);
    assert_eq!(
        schedule.next_due(&shop()),
        Some(start + Duration::from_secs(86_400))
    );

    drop(reg.acquire(&id("qa-idle"), WAIT).await.unwrap());
    let busy = reg.acquire(&id("qa-busy"), WAIT).await.unwrap();
    drop(reg.acquire(&id("pr-1"), WAIT).await.unwrap());
    for b in ["qa-idle", "qa-busy", "pr-1"] {
        assert_eq!(snapshot_of(&reg, b), "s1");
    }

    // Nothing is due before the moment.
    reg.clock().advance(Duration::from_secs(3600));
    assert!(schedule.step(&reg, reg.clock().now()).await.is_empty());

    reg.clock().advance(Duration::from_secs(23 * 3600));
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert!(
        out.contains(&Outcome::Taken {
            source: shop(),
            snapshot: "t001".into()
        }),
        "{out:?}"
    );
    assert!(
        out.contains(&Outcome::Refreshed {
            id: id("qa-idle"),
            snapshot: "t001".into()
        }),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Outcome::Waiting { id: i, .. } if *i == id("qa-busy"))),
        "{out:?}"
    );
    assert_eq!(snapshot_of(&reg, "qa-idle"), "t001");
    assert_eq!(
        snapshot_of(&reg, "qa-busy"),
        "s1",
        "a busy branch keeps its data"
    );
    assert_eq!(snapshot_of(&reg, "pr-1"), "s1", "no on_snapshot policy");
    // s1 is still used, so it stays although only one is kept.
    assert!(engine.snapshots.lock().unwrap().contains("s1"));
    assert_eq!(
        schedule.next_due(&shop()),
        Some(start + Duration::from_secs(2 * 86_400))
    );

    // Still busy: it waits again, and its session is not ended.
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert!(matches!(&out[..], [Outcome::Waiting { .. }]), "{out:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(10), busy.guard.ended())
            .await
            .is_err()
    );
    drop(busy);
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert!(
        out.contains(&Outcome::Refreshed {
            id: id("qa-busy"),
            snapshot: "t001".into()
        }),
        "{out:?}"
    );
    assert_eq!(snapshot_of(&reg, "qa-busy"), "t001");
    // Nothing is left to refresh; a branch made after the snapshot is not reset.
    drop(reg.acquire(&id("qa-new"), WAIT).await.unwrap());
    assert!(schedule.step(&reg, reg.clock().now()).await.is_empty());
    let ok = reg
        .metrics()
        .scheduled_snapshots_total
        .with_label_values(&["shop", "ok"]);
    assert_eq!(ok.get(), 1);
    assert_eq!(engine.snapshots_taken.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn old_snapshots_beyond_keep_are_pruned_once_unused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    engine.snapshots.lock().unwrap().insert("s1".into());
    let reg = registry(engine.clone(), scheduled("1h", Some(1)), dir.path());
    let schedule = Schedule::new(&reg, reg.clock().now());
    drop(reg.acquire(&id("pr-1"), WAIT).await.unwrap());
    reg.clock().advance(Duration::from_secs(3600));
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        engine.snapshots.lock().unwrap().contains("s1"),
        "pr-1 uses it"
    );
    reg.delete(&id("pr-1"), false, crate::branch::RemoveReason::Api)
        .await
        .unwrap();
    reg.clock().advance(Duration::from_secs(3600));
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert!(
        out.contains(&Outcome::Pruned {
            source: shop(),
            snapshot: "s1".into()
        }),
        "{out:?}"
    );
    assert!(
        out.contains(&Outcome::Pruned {
            source: shop(),
            snapshot: "t001".into()
        }),
        "{out:?}"
    );
    let left: Vec<String> = engine.snapshots.lock().unwrap().iter().cloned().collect();
    assert_eq!(left, vec!["t002".to_string()]);
}

#[tokio::test]
async fn a_failed_snapshot_is_counted_and_the_next_is_due_a_period_later() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine::default());
    *engine.fail_snapshot.lock().unwrap() = Some("source unreachable".into());
    let reg = registry(engine.clone(), scheduled("1h", None), dir.path());
    let start: SystemTime = reg.clock().now();
    let schedule = Schedule::new(&reg, start);
    // Three periods pass unseen (the proxy was busy): one snapshot, not three.
    reg.clock().advance(Duration::from_secs(3 * 3600 + 60));
    let out = schedule.step(&reg, reg.clock().now()).await;
    assert!(
        matches!(&out[..], [Outcome::Failed { error, .. }] if error.contains("unreachable")),
        "{out:?}"
    );
    assert_eq!(
        schedule.next_due(&shop()),
        Some(start + Duration::from_secs(4 * 3600))
    );
    let failed = reg
        .metrics()
        .scheduled_snapshots_total
        .with_label_values(&["shop", "failed"]);
    assert_eq!(failed.get(), 1);
}
