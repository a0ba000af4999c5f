use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;
use crate::names::{BranchId, BranchName, SourceName};

fn id(branch: &str) -> BranchId {
    BranchId {
        source: SourceName::new("shop").unwrap(),
        branch: BranchName::new(branch).unwrap(),
    }
}

fn start(dir: &Path, rotation: Rotation) -> (Audit, Clock, Arc<Metrics>) {
    let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(
        dir,
        rotation,
        Webhooks::default(),
        clock.clone(),
        metrics.clone(),
    )
    .unwrap();
    (audit, clock, metrics)
}

#[tokio::test]
async fn lines_are_json_with_every_field_and_read_back_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (audit, clock, metrics) = start(dir.path(), Rotation::default());
    audit.record(
        Event::new(
            Action::BranchCreated,
            Actor::client(Some("app".into()), Some("127.0.0.1:5000".into())),
        )
        .branch(&id("pr-1"))
        .snapshot(Some("s1"))
        .duration(Duration::from_millis(1234)),
    );
    clock.advance(Duration::from_secs(60));
    audit.record(
        Event::new(Action::BranchExpired, Actor::reaper())
            .branch(&id("pr-1"))
            .reason("idle 1m"),
    );
    audit.sync().await;

    let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["at"], "2023-11-14T22:13:20.000Z");
    assert_eq!(lines[0]["action"], "branch.created");
    assert_eq!(lines[0]["source"], "shop");
    assert_eq!(lines[0]["branch"], "pr-1");
    assert_eq!(lines[0]["snapshot"], "s1");
    assert_eq!(lines[0]["actor"]["kind"], "client");
    assert_eq!(lines[0]["actor"]["role"], "app");
    assert_eq!(lines[0]["actor"]["addr"], "127.0.0.1:5000");
    assert!(lines[0]["actor"]["token_name"].is_null());
    assert_eq!(lines[0]["duration_ms"], 1234);
    assert_eq!(lines[0]["outcome"], "ok");
    assert!(lines[0]["reason"].is_null());
    assert_eq!(lines[1]["reason"], "idle 1m");
    assert_eq!(lines[1]["actor"]["kind"], "reaper");

    let all = audit.query(Filter::default()).await.unwrap();
    let actions: Vec<Action> = all.iter().map(|e| e.action).collect();
    assert_eq!(actions, [Action::BranchExpired, Action::BranchCreated]);
    assert!(metrics
        .render()
        .contains("offshoot_audit_lines_total{outcome=\"written\"} 2"));
}

#[tokio::test]
async fn filters_select_by_source_branch_action_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let (audit, clock, _) = start(dir.path(), Rotation::default());
    for b in ["a", "b", "a"] {
        audit.record(Event::new(Action::BranchCreated, Actor::default()).branch(&id(b)));
        clock.advance(Duration::from_secs(10));
    }
    audit.record(Event::new(Action::SnapshotTaken, Actor::scheduler()).source("shop"));
    let now = clock.now();
    let q =
        |branch: Option<&str>, action: Option<&str>, since: Option<&str>, limit: Option<&str>| {
            Filter::parse(
                Some("shop".into()),
                branch.map(str::to_owned),
                action.map(str::to_owned),
                since,
                limit,
                now,
            )
            .unwrap()
        };
    assert_eq!(
        audit
            .query(q(Some("a"), None, None, None))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        audit
            .query(q(None, Some("branch.*"), None, None))
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        audit
            .query(q(None, Some("snapshot.taken"), None, None))
            .await
            .unwrap()
            .len(),
        1
    );
    // The last two (the third creation 10 s ago, the snapshot now).
    assert_eq!(
        audit
            .query(q(None, None, Some("10s"), None))
            .await
            .unwrap()
            .len(),
        2
    );
    let one = audit.query(q(None, None, None, Some("1"))).await.unwrap();
    assert_eq!(one[0].action, Action::SnapshotTaken);
    let other = Filter::parse(Some("other".into()), None, None, None, None, now).unwrap();
    assert!(audit.query(other).await.unwrap().is_empty());
}

#[test]
fn bad_filter_parameters_name_the_parameter() {
    let now = SystemTime::now();
    let err = Filter::parse(None, None, Some("branch.creatd".into()), None, None, now).unwrap_err();
    assert_eq!(err.param, "action");
    let err = Filter::parse(None, None, None, Some("yesterday"), None, now).unwrap_err();
    assert_eq!(err.param, "since");
    for limit in ["0", "-1", "many", "100000"] {
        let err = Filter::parse(None, None, None, None, Some(limit), now).unwrap_err();
        assert_eq!(err.param, "limit");
    }
    let f = Filter::parse(None, None, None, Some("2026-01-31T12:00:00Z"), None, now).unwrap();
    assert_eq!(
        f.since,
        Some(humantime::parse_rfc3339("2026-01-31T12:00:00Z").unwrap())
    );
}

#[tokio::test]
async fn rotates_by_size_keeps_the_newest_files_and_reads_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let rotation = Rotation {
        max_bytes: 1000,
        keep: 2,
    };
    let (audit, clock, _) = start(dir.path(), rotation);
    for i in 0..40 {
        audit.record(
            Event::new(Action::BranchCreated, Actor::default()).branch(&id(&format!("b{i}"))),
        );
        clock.advance(Duration::from_secs(1));
    }
    audit.sync().await;
    let files: Vec<_> = (0..4).map(|n| writer::path_of(dir.path(), n)).collect();
    assert!(files[0].exists() && files[1].exists() && files[2].exists());
    assert!(!files[3].exists(), "only `keep` rotated files stay");
    for f in &files[..3] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.len() as u64 <= rotation.max_bytes);
        // Whole lines only.
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            serde_json::from_str::<Event>(line).unwrap();
        }
    }
    let filter = Filter {
        limit: 1000,
        ..Filter::default()
    };
    let events = audit.query(filter).await.unwrap();
    let names: Vec<String> = events.iter().map(|e| e.branch.clone().unwrap()).collect();
    assert_eq!(names[0], "b39");
    // Newest first across files, with no gap.
    for pair in names.windows(2) {
        let n = |s: &str| s[1..].parse::<u32>().unwrap();
        assert_eq!(n(&pair[0]), n(&pair[1]) + 1);
    }
    assert!(names.len() > 10 && names.len() < 40);
}

#[tokio::test]
async fn a_torn_last_line_is_skipped_and_the_next_event_starts_a_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(FILE), b"{\"at\":\"2023-11-14T22:1").unwrap();
    let (audit, _, _) = start(dir.path(), Rotation::default());
    audit.record(Event::new(Action::SnapshotDeleted, Actor::default()).source("shop"));
    let events = audit.query(Filter::default()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, Action::SnapshotDeleted);
}

#[test]
fn action_patterns() {
    assert!(Action::BranchCreated.matches("branch.created"));
    assert!(Action::BranchCreated.matches("branch.*"));
    assert!(Action::BranchCreated.matches("*"));
    assert!(!Action::BranchCreated.matches("snapshot.*"));
    assert!(!Action::BranchCreated.matches("branch.creat*"));
    assert!(!Action::is_pattern("branches.*"));
    for a in Action::ALL {
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{}\"", a.as_str()));
    }
}
