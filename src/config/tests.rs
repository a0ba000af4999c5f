use std::time::Duration;

use super::*;

fn name(s: &str) -> SourceName {
    SourceName::new(s).unwrap()
}

#[test]
fn empty_file_is_valid() {
    let cfg = Config::from_toml("").unwrap();
    assert_eq!(cfg.proxy.listen.port(), 6432);
    assert_eq!(cfg.proxy.separator, ".");
    assert!(cfg.sources.is_empty());
}

#[test]
fn durations_are_human() {
    let cfg = Config::from_toml(
        "[proxy]\nstartup_timeout = \"250ms\"\n[sources.shop]\nidle_expire = \"2h\"\n",
    )
    .unwrap();
    assert_eq!(cfg.proxy.startup_timeout, Duration::from_millis(250));
    assert_eq!(
        cfg.sources[&name("shop")].idle_expire,
        Some(Duration::from_secs(7200))
    );
}

fn err(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    assert!(err("[proxy]\nseparator = \"-\"\n").contains("proxy.separator"));
    assert!(err("[sources.shop]\nmax_branches = 0\n").contains("sources.shop.max_branches"));
    assert!(
        err("[sources.shop]\nmax_branches = \"many\"\n").contains("`sources.shop.max_branches`")
    );
    assert!(err("[sources.shop]\nidle_expire = \"soon\"\n").contains("sources.shop.idle_expire"));
    assert!(err("[tls]\ncert = \"a.pem\"\n").contains("tls.key"));
    assert!(err("[tls]\nmode = \"require\"\n").contains("tls.mode"));
    assert!(err("[tls]\nmode = \"always\"\n").contains("mode"));
    assert!(err("[proxy]\nlisten = \"nowhere\"\n").contains("listen"));
    assert!(err("[proxy]\nstartup_timeout = \"soon\"\n").contains("startup_timeout"));
    assert!(err("[proxy]\nlisten_typo = 1\n").contains("listen_typo"));
    assert!(err("[sources.\"a.b\"]\n").contains("sources.a.b"));
    assert!(err("[auth]\nmethod = \"md4\"\n").contains("method"));
    assert!(err("[auth]\nquery = \"SELECT 1\"\n").contains("auth.query"));
    assert!(
        err("[auth]\nmethod = \"trust\"\n[sources.shop]\ncreate_roles = [\"a\"]\n")
            .contains("sources.shop.auth_method")
    );
    assert!(
        err("[sources.s]\nengine = \"instance\"\nupstream = \"host=x\"\ndata_dir = \"/d\"\n")
            .contains("sources.s.data_dir")
    );
    assert!(
        err("[sources.s]\nengine = \"instance\"\nsettings = { \"bad name\" = \"1\" }\n")
            .contains("sources.s.settings.bad name")
    );
    assert!(err("[sources.s]\nengine = \"disk\"\n").contains("sources.s.engine"));
}

#[test]
fn persistent_entries_are_checked_once_and_named() {
    let e = err("[sources.shop]\npersistent = [\"qa\", \"Bad Name\"]\n");
    assert!(e.contains("`sources.shop.persistent[1]`"), "{e}");
    assert!(e.contains("\"Bad Name\""), "{e}");
    let e = err("[sources.shop]\ndefault_branch = \"main!\"\n");
    assert!(e.contains("`sources.shop.default_branch`"), "{e}");

    let cfg = Config::from_toml("[sources.shop]\npersistent = [\"qa\"]\n").unwrap();
    let qa = crate::names::BranchName::new("qa").unwrap();
    assert_eq!(cfg.sources[&name("shop")].persistent, vec![qa]);
}

#[test]
fn a_key_of_the_other_engine_is_refused_by_name() {
    let e = err("[sources.shop]\nsuspend_after = \"5m\"\n");
    assert!(
        e.contains("`sources.shop.suspend_after`: unknown key for engine \"database\""),
        "{e}"
    );
    assert!(e.contains("engine = \"instance\""), "{e}");
    let e = err("[sources.shop]\nengine = \"database\"\nupstream = \"host=x\"\n");
    assert!(e.contains("`sources.shop.upstream`"), "{e}");
    let e = err("[sources.s]\nengine = \"instance\"\nserver = \"host=x\"\n");
    assert!(
        e.contains("`sources.s.server`: unknown key for engine \"instance\""),
        "{e}"
    );
    assert!(e.contains("upstream"), "{e}");
    // A key no engine has.
    let e = err("[sources.shop]\nsnapshot_keep = 3\n");
    assert!(
        e.contains("`sources.shop.snapshot_keep`: unknown key for engine \"database\""),
        "{e}"
    );
}

#[test]
fn instance_sources_default_to_small_suspendable_servers() {
    let cfg = Config::from_toml(
        "[sources.full]\nengine = \"instance\"\n[sources.full.settings]\nfsync = \"off\"\n",
    )
    .unwrap();
    let src = &cfg.sources[&name("full")];
    assert_eq!(src.engine.kind(), EngineKind::Instance);
    assert_eq!(src.suspend_after(), Some(Duration::from_secs(300)));
    let EngineConfig::Instance(i) = &src.engine else {
        panic!("an instance source")
    };
    assert_eq!(i.settings["fsync"], "off");
    assert_eq!(i.shared_buffers, "32MB");
    assert_eq!(i.warm_spares, 0);
    assert!(cfg.needs_embedded());
}

#[test]
fn warm_spares_are_an_instance_key_with_a_cap() {
    let cfg =
        Config::from_toml("[sources.full]\nengine = \"instance\"\nwarm_spares = 2\n").unwrap();
    let EngineConfig::Instance(i) = &cfg.sources[&name("full")].engine else {
        panic!("an instance source")
    };
    assert_eq!(i.warm_spares, 2);
    let e = err("[sources.shop]\nwarm_spares = 2\n");
    assert!(
        e.contains("`sources.shop.warm_spares`: unknown key for engine \"database\""),
        "{e}"
    );
    assert!(e.contains("engine = \"instance\""), "{e}");
    let e = err("[sources.full]\nengine = \"instance\"\nwarm_spares = 17\n");
    assert!(e.contains("`sources.full.warm_spares`"), "{e}");
    assert!(e.contains("at most 16"), "{e}");
}

#[test]
fn database_sources_keep_their_server() {
    let cfg = Config::from_toml(
        "[sources.shop]\nserver = \"postgres://a:b@db:5432/postgres\"\ndatabase = \"shop\"\n",
    )
    .unwrap();
    let src = &cfg.sources[&name("shop")];
    assert_eq!(src.engine.kind(), EngineKind::Database);
    assert_eq!(src.server(), Some("postgres://a:b@db:5432/postgres"));
    assert_eq!(src.suspend_after(), None);
    assert!(!cfg.needs_embedded());
}

#[test]
fn every_enum_is_spelled_as_documented() {
    for (text, method) in [
        ("scram-sha-256", AuthMethod::ScramSha256),
        ("password", AuthMethod::Password),
        ("trust", AuthMethod::Trust),
        ("md5", AuthMethod::Md5),
    ] {
        let cfg = Config::from_toml(&format!("[auth]\nmethod = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.auth.method, method);
        assert_eq!(method.as_str(), text);
    }
    assert!(err("[auth]\nmethod = \"scram-sha256\"\n").contains("method"));
    for (text, mode) in [
        ("disable", TlsMode::Disable),
        ("allow", TlsMode::Allow),
        ("prefer", TlsMode::Prefer),
    ] {
        let cfg = Config::from_toml(&format!("[tls]\nmode = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.tls.mode, mode);
    }
    for (text, by) in [("database", RouteBy::Database), ("user", RouteBy::User)] {
        let cfg = Config::from_toml(&format!("[proxy]\nroute_by = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.proxy.route_by, by);
    }
    for (text, tls) in [
        ("disable", ServerTls::Disable),
        ("require", ServerTls::Require),
        ("verify-full", ServerTls::VerifyFull),
    ] {
        let cfg = Config::from_toml(&format!(
            "[sources.s]\nserver = \"host=db\"\nserver_tls = \"{text}\"\nserver_ca = \"/ca.pem\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.sources[&name("s")].server_tls, tls);
    }
    let cfg = Config::from_toml(
        "[sources.s]\nauth_method = \"scram-sha-256\"\nauth_server = \"host=db\"\n",
    )
    .unwrap();
    assert_eq!(cfg.auth_method(Some("s")), AuthMethod::ScramSha256);
}

const POLICIES: &str = r#"
[sources.shop]
idle_expire = "1h"
connect_roles = ["app"]
persistent = ["main"]
[[sources.shop.policies]]
match = "qa*"
persistent = true
refresh = "on_snapshot"
idle_expire = "never"
[[sources.shop.policies]]
match = "pr-*"
idle_expire = "2h"
max_lifetime = "7d"
create_roles = ["ci"]
max_branches = 10
[[sources.shop.policies]]
match = "*"
idle_expire = "30m"
protected = true
"#;

#[test]
fn policies_resolve_first_match_over_source_defaults() {
    let cfg = Config::from_toml(POLICIES).unwrap();
    let src = &cfg.sources[&name("shop")];
    let b = |s: &str| crate::names::BranchName::new(s).unwrap();
    let qa = src.policy(&b("qa-eu"));
    assert_eq!(qa.name, Some("qa*"));
    assert_eq!(qa.index, Some(0));
    assert!(qa.persistent && !qa.protected);
    assert_eq!(qa.idle_expire, None);
    assert_eq!(qa.refresh, Refresh::OnSnapshot);
    assert_eq!(qa.connect_roles, ["app"]);
    let pr = src.policy(&b("pr-7"));
    assert_eq!(pr.name, Some("pr-*"));
    assert_eq!(pr.idle_expire, Some(Duration::from_secs(7200)));
    assert_eq!(pr.max_lifetime, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(pr.create_roles, ["ci"]);
    assert_eq!(pr.max_branches, Some(10));
    assert!(!pr.persistent);
    let other = src.policy(&b("main"));
    assert_eq!(other.name, Some("*"));
    assert_eq!(other.idle_expire, Some(Duration::from_secs(1800)));
    assert!(
        other.persistent,
        "the source's persistent list still counts"
    );
    assert!(other.protected);
    assert_eq!(other.refresh, Refresh::Never);

    // Without policies the source's keys govern, under no name.
    let cfg = Config::from_toml("[sources.shop]\nmax_lifetime = \"1d\"\n").unwrap();
    let p = cfg.sources[&name("shop")].policy(&b("x"));
    assert_eq!(p.name, None);
    assert_eq!(p.idle_expire, Some(Duration::from_secs(7200)));
    assert_eq!(p.max_lifetime, Some(Duration::from_secs(86400)));
}

#[test]
fn policies_that_can_never_match_are_refused_by_index_and_pattern() {
    let e = err("[sources.shop]\n[[sources.shop.policies]]\nmatch = \"*\"\n[[sources.shop.policies]]\nmatch = \"pr-*\"\n");
    assert!(e.contains("`sources.shop.policies[1].match`"), "{e}");
    assert!(e.contains("\"pr-*\""), "{e}");
    assert!(e.contains("policies[0] (\"*\")"), "{e}");
    let e = err("[sources.shop]\n[[sources.shop.policies]]\nmatch = \"qa\"\n[[sources.shop.policies]]\nmatch = \"pr-*\"\n[[sources.shop.policies]]\nmatch = \"qa\"\n");
    assert!(e.contains("`sources.shop.policies[2].match`"), "{e}");
    assert!(e.contains("policies[0] has the same pattern"), "{e}");
    // A narrower pattern before a wider one is fine.
    Config::from_toml("[sources.shop]\n[[sources.shop.policies]]\nmatch = \"pr-1*\"\n[[sources.shop.policies]]\nmatch = \"pr-*\"\n[[sources.shop.policies]]\nmatch = \"*\"\n").unwrap();
}

#[test]
fn policy_keys_are_checked_by_name() {
    let p = |body: &str| {
        err(&format!(
            "[sources.shop]\n[[sources.shop.policies]]\n{body}\n"
        ))
    };
    let e = p("match = \"pr-*\"\nidle_expires = \"2h\"");
    assert!(e.contains("sources.shop.policies"), "{e}");
    assert!(e.contains("idle_expires"), "{e}");
    let e = p("idle_expire = \"2h\"");
    assert!(e.contains("match"), "{e}");
    let e = p("match = \"PR-*\"");
    assert!(e.contains("`sources.shop.policies[0].match`"), "{e}");
    assert!(e.contains("never appears in a branch name"), "{e}");
    let e = p("match = \"pr-*\"\nmax_lifetime = \"soon\"");
    assert!(e.contains("`sources.shop.policies[0].max_lifetime`"), "{e}");
    assert!(e.contains("\"never\""), "{e}");
    let e = p("match = \"pr-*\"\nmax_lifetime = \"0s\"");
    assert!(e.contains("`sources.shop.policies[0].max_lifetime`"), "{e}");
    let e = p("match = \"pr-*\"\nrefresh = \"daily\"");
    assert!(e.contains("refresh"), "{e}");
    let e = p("match = \"pr-*\"\nsuspend_after = \"5m\"");
    assert!(
        e.contains("`sources.shop.policies[0].suspend_after`"),
        "{e}"
    );
    let e = p("match = \"pr-*\"\nmax_branches = 0");
    assert!(e.contains("`sources.shop.policies[0].max_branches`"), "{e}");
    let e = err("[auth]\nmethod = \"trust\"\n[sources.shop]\n[[sources.shop.policies]]\nmatch = \"*\"\ncreate_roles = [\"ci\"]\n");
    assert!(e.contains("sources.shop.auth_method"), "{e}");
}

#[test]
fn snapshot_and_size_keys_parse_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mask = dir.path().join("mask.sql");
    std::fs::write(&mask, "SELECT 1;").unwrap();
    let cfg = Config::from_toml(&format!(
        "[sources.shop]\nsnapshot_every = \"24h\"\nsnapshot_at = \"03:00\"\nkeep_snapshots = 3\n\
         snapshot_transform = [{mask:?}]\nmax_total_size = \"10GB\"\n"
    ))
    .unwrap();
    let src = &cfg.sources[&name("shop")];
    assert_eq!(src.snapshot_every, Some(Duration::from_secs(86400)));
    assert_eq!(src.snapshot_at, Some(TimeOfDay::new(3, 0).unwrap()));
    assert_eq!(src.keep_snapshots, Some(3));
    assert_eq!(src.snapshot_transform, vec![mask.clone()]);
    assert_eq!(src.max_total_size, Some(ByteSize(10 << 30)));

    let e = err("[sources.shop]\nsnapshot_at = \"03:00\"\n");
    assert!(
        e.contains("`sources.shop.snapshot_at`") && e.contains("snapshot_every"),
        "{e}"
    );
    let e = err("[sources.shop]\nsnapshot_every = \"1h\"\nsnapshot_at = \"3am\"\n");
    assert!(
        e.contains("sources.shop.snapshot_at") && e.contains("UTC"),
        "{e}"
    );
    let e = err("[sources.shop]\nsnapshot_every = \"10s\"\n");
    assert!(e.contains("`sources.shop.snapshot_every`"), "{e}");
    let e = err("[sources.shop]\nkeep_snapshots = 0\n");
    assert!(e.contains("`sources.shop.keep_snapshots`"), "{e}");
    let e = err("[sources.shop]\nsnapshot_transform = [\"/no/such/mask.sql\"]\n");
    assert!(e.contains("`sources.shop.snapshot_transform[0]`"), "{e}");
    let e = err("[sources.shop]\nmax_total_size = \"lots\"\n");
    assert!(e.contains("sources.shop.max_total_size"), "{e}");
}

#[test]
fn webhooks_are_a_top_level_list() {
    let cfg = Config::from_toml(
        "[[webhooks]]\nurl = \"https://hooks.example.com/offshoot\"\n\
         events = [\"branch.created\", \"branch.*\"]\nsecret_file = \"/etc/offshoot/hook.key\"\n\
         [[webhooks]]\nurl = \"http://127.0.0.1:9000/\"\ntimeout = \"2s\"\n",
    )
    .unwrap();
    assert_eq!(cfg.webhooks.len(), 2);
    assert_eq!(cfg.webhooks[0].events.len(), 2);
    assert_eq!(cfg.webhooks[0].timeout, Duration::from_secs(10));
    assert_eq!(cfg.webhooks[1].timeout, Duration::from_secs(2));
    let e = err("[[webhooks]]\nurl = \"ftp://x\"\n");
    assert!(e.contains("`webhooks[0].url`"), "{e}");
    let e = err("[[webhooks]]\nurl = \"http://x\"\nevents = [\"created\"]\n");
    assert!(e.contains("`webhooks[0].events[0]`"), "{e}");
    let e = err("[[webhooks]]\nurl = \"http://x\"\nsecret = \"s\"\n");
    assert!(e.contains("secret"), "{e}");
}
