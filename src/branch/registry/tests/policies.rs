//! Policies by branch name, TTLs and protection, on the manual clock.

use super::*;
use crate::branch::reaper::{reap_once, Outcome};
use crate::config::Config;

const START_MS: u64 = 1_700_000_000_000;
const MIN: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

fn shop(policies: &str) -> SourceConfig {
    let text = format!("[sources.shop]\nidle_expire = \"1h\"\n{policies}");
    let mut cfg = Config::from_toml(&text).unwrap();
    cfg.sources
        .remove(&crate::names::SourceName::new("shop").unwrap())
        .unwrap()
}

const SHAPES: &str = r#"
[[sources.shop.policies]]
match = "qa*"
persistent = true
[[sources.shop.policies]]
match = "pr-*"
idle_expire = "2h"
max_lifetime = "3h"
max_branches = 2
[[sources.shop.policies]]
match = "keep-*"
protected = true
"#;

fn expired(out: &[Outcome]) -> Vec<(String, RemoveReason)> {
    let mut v: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Outcome::Expired { id, reason, .. } => Some((id.branch.to_string(), *reason)),
            _ => None,
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn api() -> crate::audit::Actor {
    crate::audit::Actor::api(None, None)
}

fn at(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[tokio::test]
async fn the_first_matching_pattern_decides_idle_expiry_and_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    let clock = reg.clock().clone();
    for b in ["other", "pr-1", "qa", "keep-me"] {
        drop(reg.acquire(&id(b), WAIT).await.unwrap());
    }
    let view = |b: &str| reg.view(&id(b)).unwrap();
    assert_eq!(view("pr-1").policy.as_deref(), Some("pr-*"));
    assert_eq!(view("other").policy, None);
    // Idle deadline 2h, lifetime 3h: the earlier shows.
    assert_eq!(view("pr-1").expires_at, Some(at(START_MS + 2 * 3_600_000)));
    assert_eq!(view("other").expires_at, Some(at(START_MS + 3_600_000)));
    assert_eq!(view("qa").expires_at, None, "persistent");
    assert!(view("qa").persistent);
    assert_eq!(view("keep-me").expires_at, None, "protected for good");
    assert!(view("keep-me").protected);
    assert_eq!(view("pr-1").born_at, at(START_MS));

    // The source's own idle_expire governs names no policy matches.
    clock.advance(HOUR + MIN);
    let out = reap_once(&reg, clock.now()).await;
    assert_eq!(expired(&out), [("other".into(), RemoveReason::Idle)]);

    // Used at 1h30, pr-1's idle deadline moves to 3h30, past its lifetime of 3h.
    clock.advance(29 * MIN);
    drop(reg.acquire(&id("pr-1"), WAIT).await.unwrap());
    assert_eq!(view("pr-1").expires_at, Some(at(START_MS + 3 * 3_600_000)));
    clock.advance(HOUR + 29 * MIN);
    assert!(expired(&reap_once(&reg, clock.now()).await).is_empty());
    clock.advance(MIN);
    let out = reap_once(&reg, clock.now()).await;
    assert_eq!(expired(&out), [("pr-1".into(), RemoveReason::Lifetime)]);
    assert_eq!(
        reg.metrics
            .branches_expired_total
            .with_label_values(&["shop", "lifetime"])
            .get(),
        1
    );

    // Days later the persistent and the protected branch are still there.
    clock.advance(100 * HOUR);
    assert!(expired(&reap_once(&reg, clock.now()).await).is_empty());
    let left: Vec<String> = reg.list().into_iter().map(|b| b.branch).collect();
    assert_eq!(left, ["keep-me", "qa"]);
}

#[tokio::test]
async fn a_lifetime_counts_from_the_last_reset() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    let clock = reg.clock().clone();
    let _open = reg.acquire(&id("pr-1"), WAIT).await.unwrap();
    clock.advance(2 * HOUR);
    {
        let mut book = reg.lock();
        let b = book.branches.get_mut(&id("pr-1")).unwrap();
        b.record.reborn(clock.unix_ms());
    }
    let v = reg.view(&id("pr-1")).unwrap();
    assert_eq!(v.born_at, at(START_MS + 2 * 3_600_000));
    assert_eq!(v.expires_at, Some(at(START_MS + 5 * 3_600_000)));
}

#[tokio::test]
async fn a_ttl_replaces_the_policy_deadlines_and_can_be_changed() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    let clock = reg.clock().clone();
    let ttl = START_MS + 30 * 60_000;
    let opts = CreateOptions {
        expires_at: Some(ttl),
        ..Default::default()
    };
    let (view, created) = reg.ensure(&id("pr-7"), &opts, WAIT).await.unwrap();
    assert!(created);
    assert_eq!(view.expires_at, Some(at(ttl)));

    // A day more from the PATCH, then the TTL taken away again.
    let later = START_MS + 24 * 3_600_000;
    let changes = Changes {
        expires_at: Some(Some(later)),
        ..Default::default()
    };
    assert_eq!(
        reg.update(&id("pr-7"), &changes, api()).unwrap().expires_at,
        Some(at(later))
    );
    let rec = Store::open(dir.path()).unwrap().load_all().unwrap().0;
    assert_eq!(rec[0].expires_at, Some(later), "saved for a restart");
    clock.advance(3 * HOUR);
    assert!(expired(&reap_once(&reg, clock.now()).await).is_empty());
    clock.advance(21 * HOUR);
    let out = reap_once(&reg, clock.now()).await;
    assert_eq!(expired(&out), [("pr-7".into(), RemoveReason::Ttl)]);

    // A persistent branch takes no TTL.
    drop(reg.acquire(&id("qa"), WAIT).await.unwrap());
    let e = reg.update(&id("qa"), &changes, api()).unwrap_err();
    assert!(matches!(e, UpdateError::Persistent { .. }), "{e}");
    assert!(e.to_string().contains("its policy"), "{e}");
}

#[tokio::test]
async fn protection_refuses_deletion_until_forced_or_expired() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    let clock = reg.clock().clone();
    drop(reg.acquire(&id("keep-1"), WAIT).await.unwrap());
    let e = reg
        .delete(&id("keep-1"), false, RemoveReason::Api)
        .await
        .unwrap_err();
    assert!(matches!(e, DeleteError::Guarded { .. }), "{e}");
    assert!(e.to_string().contains("protected (its policy)"), "{e}");
    assert_eq!(
        reg.reset_guard(&id("keep-1")),
        reg.protection_at_now("keep-1")
    );
    reg.delete(&id("keep-1"), true, RemoveReason::Api)
        .await
        .unwrap();

    // Protected through the API for an hour: idle past its deadline, the reaper
    // waits for the protection to end.
    drop(reg.acquire(&id("other"), WAIT).await.unwrap());
    let until = START_MS + 2 * 3_600_000;
    let changes = Changes {
        protected_until: Some(Some(until)),
        ..Default::default()
    };
    let v = reg.update(&id("other"), &changes, api()).unwrap();
    assert!(v.protected);
    assert_eq!(v.protected_until, Some(at(until)));
    assert_eq!(v.expires_at, Some(at(until)));
    clock.advance(HOUR + MIN);
    assert!(expired(&reap_once(&reg, clock.now()).await).is_empty());
    let e = reg
        .delete(&id("other"), false, RemoveReason::Api)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("protected until"), "{e}");
    clock.advance(HOUR);
    assert!(!reg.view(&id("other")).unwrap().protected);
    let out = reap_once(&reg, clock.now()).await;
    assert_eq!(expired(&out), [("other".into(), RemoveReason::Idle)]);
}

#[tokio::test]
async fn deleting_a_persistent_branch_needs_force_and_protection_can_be_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    drop(reg.acquire(&id("qa"), WAIT).await.unwrap());
    let e = reg
        .delete(&id("qa"), false, RemoveReason::Api)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("persistent (its policy)"), "{e}");
    reg.delete(&id("qa"), true, RemoveReason::Api)
        .await
        .unwrap();

    drop(reg.acquire(&id("keep-2"), WAIT).await.unwrap());
    let off = Changes {
        protected: Some(false),
        ..Default::default()
    };
    assert!(!reg.update(&id("keep-2"), &off, api()).unwrap().protected);
    assert_eq!(reg.reset_guard(&id("keep-2")), None);
    reg.delete(&id("keep-2"), false, RemoveReason::Api)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_policy_counts_its_own_branches_and_if_exists_fail_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(Arc::new(FakeEngine::default()), shop(SHAPES), dir.path());
    for b in ["pr-1", "pr-2", "other"] {
        drop(reg.acquire(&id(b), WAIT).await.unwrap());
    }
    let Err(e) = reg.acquire(&id("pr-3"), WAIT).await else {
        panic!("a third pr-* branch is refused")
    };
    assert!(
        matches!(e, ProvisionError::PolicyQuota { limit: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("policy \"pr-*\""), "{e}");
    assert_eq!(e.sqlstate(), "53400");
    assert_eq!(
        reg.metrics
            .policy_refusals_total
            .with_label_values(&["shop", "max_branches"])
            .get(),
        1
    );
    // Other names are not counted against it.
    drop(reg.acquire(&id("other-2"), WAIT).await.unwrap());

    let fail = CreateOptions {
        if_exists: IfExists::Fail,
        ..Default::default()
    };
    let e = reg.ensure(&id("pr-1"), &fail, WAIT).await.unwrap_err();
    assert!(matches!(e, ProvisionError::Conflict(_)), "{e}");
    let (v, created) = reg
        .ensure(&id("pr-1"), &CreateOptions::default(), WAIT)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(v.branch, "pr-1");
}

#[tokio::test]
async fn max_total_size_refuses_new_branches_once_measured_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine {
        clone_bytes: Some(600 << 20),
        ..Default::default()
    });
    let reg = registry(engine, shop("max_total_size = \"1GB\"\n"), dir.path());
    drop(reg.acquire(&id("a"), WAIT).await.unwrap());
    // Not measured yet: nothing is known to be past the limit.
    assert_eq!(reg.view(&id("a")).unwrap().size_bytes, None);
    drop(reg.acquire(&id("b"), WAIT).await.unwrap());
    reg.refresh_sizes().await;
    let v = reg.view(&id("a")).unwrap();
    assert_eq!((v.size_bytes, v.size_exact), (Some(600 << 20), Some(true)));
    let Err(e) = reg.acquire(&id("c"), WAIT).await else {
        panic!("1200MB of 1GB: refused")
    };
    assert!(matches!(e, ProvisionError::SizeQuota { .. }), "{e}");
    assert_eq!(e.sqlstate(), "53400");
    let msg = e.to_string();
    assert!(
        msg.contains("1200MB") && msg.contains("max_total_size of 1GB"),
        "{msg}"
    );
    // Deleting one makes room at once.
    reg.delete(&id("b"), false, RemoveReason::Api)
        .await
        .unwrap();
    drop(reg.acquire(&id("c"), WAIT).await.unwrap());
}

impl Registry {
    fn protection_at_now(&self, b: &str) -> Option<Guard> {
        let book = self.lock();
        self.protection_at(&book.branches[&id(b)].record, self.clock.unix_ms())
    }
}
