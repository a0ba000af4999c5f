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
    assert!(cfg.needs_embedded());
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
