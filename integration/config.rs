//! Every configuration the project ships or documents passes the real
//! `offshoot check`: the files in `conf/`, the ones docker-compose.yml mounts (with the
//! environment it sets), and every TOML snippet in README.md. Bad keys fail, naming
//! the key.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `offshoot check --config path` with `env`; returns success and the output.
fn check(path: &Path, env: &[(String, String)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["check", "--config"])
        .arg(path)
        .env_remove("OFFSHOOT_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Writes `text` to a temporary file and checks it.
fn check_text(text: &str, env: &[(String, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offshoot.toml");
    std::fs::write(&path, text).unwrap();
    check(&path, env)
}

#[test]
fn every_shipped_config_passes_check() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("conf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "conf/ should hold the shipped configs: {files:?}"
    );
    for f in &files {
        let (ok, out) = check(f, &[]);
        assert!(ok, "{}: {out}", f.display());
        assert!(out.contains("configuration is valid"), "{out}");
    }
}

/// The config files docker-compose.yml mounts into the `offshoot` service, and the
/// `OFFSHOOT__...` variables it sets there.
fn compose_configs() -> (Vec<PathBuf>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    let mut files = Vec::new();
    let mut env = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(mount) = line.strip_prefix("- ./") {
            if let Some((file, _)) = mount.split_once(':') {
                if file.ends_with(".toml") {
                    files.push(Path::new(ROOT).join(file));
                }
            }
        } else if line.starts_with("OFFSHOOT__") {
            let (k, v) = line.split_once(':').unwrap();
            env.push((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()));
        }
    }
    (files, env)
}

#[test]
fn the_compose_configs_pass_check_with_the_compose_environment() {
    let (files, env) = compose_configs();
    assert!(!files.is_empty(), "docker-compose.yml mounts a config");
    assert!(
        env.iter().any(|(k, _)| k == "OFFSHOOT__PROXY__LISTEN"),
        "{env:?}"
    );
    for f in &files {
        let (ok, out) = check(f, &env);
        assert!(ok, "{} with {env:?}: {out}", f.display());
    }
}

/// The ```toml blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => current = Some(String::new()),
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```toml block");
    blocks
}

#[test]
fn every_toml_snippet_in_the_readme_passes_check() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let blocks = toml_blocks(&readme);
    assert!(blocks.len() >= 2, "README.md has TOML examples: {blocks:?}");
    for block in &blocks {
        // Every snippet is a whole document (its keys under their table headers), so
        // each documented key reaches the parser as written.
        let (ok, out) = check_text(block, &[]);
        assert!(ok, "README snippet fails `offshoot check`:\n{block}\n{out}");
    }
}

#[test]
fn the_staging_example_in_the_readme_is_the_shipped_file() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let staging = std::fs::read_to_string(Path::new(ROOT).join("conf/staging.toml")).unwrap();
    assert!(
        toml_blocks(&readme).contains(&staging),
        "README's \"Running staging with Offshoot\" shows conf/staging.toml as it is"
    );
}

#[test]
fn a_bad_key_fails_check_and_names_the_key() {
    for (text, key) in [
        (
            "[sources.shop]\nsuspend_after = \"5m\"\n",
            "sources.shop.suspend_after",
        ),
        (
            "[sources.shop]\nsnapshot_keep = 3\n",
            "sources.shop.snapshot_keep",
        ),
        (
            "[sources.full]\nengine = \"instance\"\nserver = \"host=db\"\n",
            "sources.full.server",
        ),
        (
            "[sources.shop]\npersistent = [\"qa\", \"Not Valid\"]\n",
            "sources.shop.persistent[1]",
        ),
        ("[auth]\nmethod = \"scram-sha256\"\n", "auth.method"),
        (
            "[sources.shop]\n[[sources.shop.policies]]\nmatch = \"*\"\n\
             [[sources.shop.policies]]\nmatch = \"pr-*\"\n",
            "sources.shop.policies[1].match",
        ),
        (
            "[sources.shop]\n[[sources.shop.policies]]\nmatch = \"pr-*\"\nttl = \"1d\"\n",
            "sources.shop.policies[0]",
        ),
        (
            "[sources.shop]\nsnapshot_transform = [\"conf/no-such-mask.sql\"]\n",
            "sources.shop.snapshot_transform[0]",
        ),
    ] {
        let (ok, out) = check_text(text, &[]);
        assert!(!ok, "{text} should be refused: {out}");
        assert!(out.contains(&format!("`{key}`")), "{text}: {out}");
        assert!(!out.contains("SourceName("), "no debug text: {out}");
    }
}

#[test]
fn list_keys_can_be_overridden_from_the_environment() {
    let text = "[sources.shop]\n";
    let env = |v: &str| {
        vec![(
            "OFFSHOOT__SOURCES__SHOP__PERSISTENT".to_owned(),
            v.to_owned(),
        )]
    };
    let (ok, out) = check_text(text, &env("qa,staging"));
    assert!(ok, "{out}");
    let (ok, out) = check_text(text, &env("qa,Not-Valid"));
    assert!(!ok, "{out}");
    assert!(out.contains("`sources.shop.persistent[1]`"), "{out}");
}
