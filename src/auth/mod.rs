//! Who may connect: roles' stored passwords and how the proxy finds them.
//!
//! [`scram`] holds the protocol arithmetic; [`Credentials`] finds a role's stored
//! password, either in the users file or by running `auth.query` on the source's
//! server over a dedicated connection that never sees client parameters. The
//! client-facing exchange lives in `proxy::auth`.
//!
//! Invariant: nothing here tells an unknown role from a wrong password. A role that
//! is missing, has no password, or has an expired one is answered with a mock
//! verifier, and the exchange fails at the same step with the same message.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::upstream::Upstream;
use tracing::{info, warn};

pub mod scram;

use scram::Verifier;

/// A role's stored password.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(Verifier),
    /// `md5` followed by 32 hex digits of md5(password || role).
    Md5(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Scram(v) => v.fmt(f),
            Secret::Md5(_) => f.write_str("Md5(..)"),
        }
    }
}

impl Secret {
    /// Parses what `pg_authid.rolpassword` holds. Plain text is not accepted.
    pub fn parse(s: &str) -> Option<Secret> {
        if let Some(v) = Verifier::parse(s) {
            return Some(Secret::Scram(v));
        }
        let hex = s.strip_prefix("md5")?;
        (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Secret::Md5(s.to_ascii_lowercase()))
    }

    /// Whether `password` is right for `role`.
    pub fn check_password(&self, role: &str, password: &str) -> bool {
        match self {
            Secret::Scram(v) => v.check_password(password),
            Secret::Md5(stored) => {
                scram::secure_eq(md5_password(password, role).as_bytes(), stored.as_bytes())
            }
        }
    }
}

/// `md5` + hex(md5(password || salt)): PostgreSQL's stored md5 form (salt = role)
/// and, salted again with the server's 4 bytes, its md5 challenge answer.
pub fn md5_password(password: &str, salt: &str) -> String {
    md5_hex(&[password.as_bytes(), salt.as_bytes()])
}

/// The answer to an AuthenticationMD5Password challenge.
pub fn md5_challenge(password: &str, role: &str, salt: [u8; 4]) -> String {
    md5_challenge_from_hash(&md5_password(password, role), salt)
}

/// The answer to an md5 challenge from the stored hash (`md5` + 32 hex digits)
/// alone: what the proxy sends a branch server for a client that proved it knows
/// the password behind that hash.
pub fn md5_challenge_from_hash(stored: &str, salt: [u8; 4]) -> String {
    md5_hex(&[&stored.as_bytes()[3..], &salt])
}

fn md5_hex(parts: &[&[u8]]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// What the proxy knows of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// `None`: the role has no usable password (NULL, empty, or not a verifier).
    pub secret: Option<Secret>,
    pub can_login: bool,
    pub valid_until: Option<SystemTime>,
}

impl Role {
    /// The secret, if the role could log in with a password right now.
    pub fn usable_secret(&self, now: SystemTime) -> Option<&Secret> {
        match self.valid_until {
            Some(t) if t < now => None,
            _ => self.secret.as_ref(),
        }
    }
}

/// The credentials could not be looked up (the auth server is down, the query is
/// wrong). Not the client's fault, and not about any role in particular.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Connections each source's `auth.query` runs on. Lookups go to the least busy
/// one, so a slow lookup (a lock on the catalog, a slow function) delays the few
/// logins that share its connection, not every login.
pub const QUERY_CONNECTIONS: usize = 4;

/// One connection of the pool: reopened when it drops; `busy` counts the lookups
/// using it now.
#[derive(Default)]
struct PooledClient {
    client: Mutex<Option<Arc<Client>>>,
    busy: AtomicUsize,
}

/// Takes a lookup off its connection's count when it ends (even if cancelled).
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `auth.query` on one server, over a small pool of connections that never see
/// client parameters.
struct QueryLookup {
    config: tokio_postgres::Config,
    upstream: Upstream,
    pool: Vec<PooledClient>,
}

impl QueryLookup {
    fn new(server: &str, upstream: &Upstream) -> Result<Self, String> {
        let mut config: tokio_postgres::Config = server
            .parse()
            .map_err(|e| format!("not a connection string: {e}"))?;
        // A fixed search_path: a role name can never make the query resolve to
        // something other than the catalog.
        let options = config.get_options().unwrap_or("").to_owned();
        config.options(format!("{options} -c search_path=pg_catalog,pg_temp").trim());
        config.application_name("offshoot-auth");
        upstream.apply(&mut config);
        Ok(Self {
            config,
            upstream: upstream.clone(),
            pool: (0..QUERY_CONNECTIONS)
                .map(|_| PooledClient::default())
                .collect(),
        })
    }

    /// The least busy connection of the pool (opened if needed), counted busy
    /// until the returned guard drops.
    async fn client(&self) -> Result<(Arc<Client>, Busy<'_>), tokio_postgres::Error> {
        let slot = self
            .pool
            .iter()
            .min_by_key(|p| p.busy.load(Ordering::Relaxed))
            .expect("the pool is not empty");
        slot.busy.fetch_add(1, Ordering::Relaxed);
        let busy = Busy(&slot.busy);
        let mut held = slot.client.lock().await;
        if let Some(c) = held.as_ref().filter(|c| !c.is_closed()) {
            return Ok((c.clone(), busy));
        }
        let client = Arc::new(self.upstream.pg_connect(&self.config, "auth query").await?);
        *held = Some(client.clone());
        Ok((client, busy))
    }

    /// Whether `role` is a superuser on this server (false for an unknown role, which
    /// the server refuses anyway). Read from `pg_roles`, whatever `auth.query` is.
    async fn is_superuser(&self, role: &str) -> Result<bool, LookupError> {
        let (client, _busy) = self
            .client()
            .await
            .map_err(|e| LookupError(format!("cannot connect to read rolsuper: {e}")))?;
        let row = client
            .query_opt(
                "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .map_err(|e| LookupError(format!("reading rolsuper failed: {e}")))?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn lookup(&self, query: &str, role: &str) -> Result<Option<Role>, LookupError> {
        let (client, _busy) = self
            .client()
            .await
            .map_err(|e| LookupError(format!("cannot connect for auth.query: {e}")))?;
        let rows = client
            .query(query, &[&role])
            .await
            .map_err(|e| LookupError(format!("auth.query failed: {e}")))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let password: Option<String> = row
            .try_get(0)
            .map_err(|e| LookupError(format!("auth.query column 1 (password): {e}")))?;
        let can_login = if row.len() > 1 {
            row.try_get::<_, Option<bool>>(1)
                .map_err(|e| LookupError(format!("auth.query column 2 (can login): {e}")))?
                .unwrap_or(false)
        } else {
            true
        };
        let valid_until = if row.len() > 2 {
            row.try_get::<_, Option<SystemTime>>(2)
                .map_err(|e| LookupError(format!("auth.query column 3 (valid until): {e}")))?
        } else {
            None
        };
        Ok(Some(Role {
            secret: password.as_deref().and_then(Secret::parse),
            can_login,
            valid_until,
        }))
    }
}

/// Finds roles' credentials for every source.
pub struct Credentials {
    query: String,
    users_file: Option<PathBuf>,
    users: RwLock<HashMap<String, Secret>>,
    /// `auth.query` per source name.
    servers: HashMap<String, QueryLookup>,
    /// Where a name that is no source is checked (the first source), so that a
    /// right password learns the source does not exist and a wrong one does not.
    fallback: Option<String>,
    /// Key of the mock verifiers, stable across restarts ([`load_secret`]), so an
    /// unknown role's salt never changes.
    mock_key: [u8; 32],
    /// `auth.max_scram_iterations`.
    max_iterations: u32,
    /// The iteration count of the last real verifier looked up: what mock
    /// verifiers use, so the count does not tell unknown roles from known ones.
    seen_iterations: AtomicU32,
}

impl Credentials {
    /// `servers` pairs each source with the connection string `auth.query` runs on
    /// and the TLS to use there; `mock_key` keys the mock verifiers.
    pub fn new(
        query: String,
        users_file: Option<PathBuf>,
        servers: Vec<(String, String, Upstream)>,
        mock_key: [u8; 32],
        max_iterations: u32,
    ) -> anyhow::Result<Self> {
        let users = match &users_file {
            Some(p) => read_users_file(p)?,
            None => HashMap::new(),
        };
        let fallback = servers.first().map(|(s, _, _)| s.clone());
        let mut lookups = HashMap::new();
        for (source, server, upstream) in servers {
            let l = QueryLookup::new(&server, &upstream)
                .map_err(|e| anyhow::anyhow!("sources.{source}.auth_server: {e}"))?;
            lookups.insert(source, l);
        }
        Ok(Self {
            query,
            users_file,
            users: RwLock::new(users),
            servers: lookups,
            fallback,
            mock_key,
            max_iterations,
            seen_iterations: AtomicU32::new(scram::DEFAULT_ITERATIONS),
        })
    }

    /// Looks `role` up for `source` (a name that may be no source at all).
    pub async fn lookup(&self, source: &str, role: &str) -> Result<Option<Role>, LookupError> {
        let from_file = self
            .users
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(role)
            .cloned();
        if let Some(secret) = from_file {
            return Ok(Some(Role {
                secret: Some(secret),
                can_login: true,
                valid_until: None,
            }));
        }
        let server = self
            .servers
            .get(source)
            .or_else(|| self.fallback.as_ref().and_then(|f| self.servers.get(f)));
        match server {
            Some(s) => s.lookup(&self.query, role).await,
            None => Ok(None),
        }
    }

    /// Whether `role` is a superuser on `source`'s server (its `auth_server`): what
    /// `sources.<name>.allow_superuser = false` refuses.
    pub async fn is_superuser(&self, source: &str, role: &str) -> Result<bool, LookupError> {
        match self.servers.get(source) {
            Some(s) => s.is_superuser(role).await,
            None => Err(LookupError(format!("source {source} has no server to ask"))),
        }
    }

    /// A verifier for a role that cannot log in, indistinguishable from a real one.
    pub fn mock(&self, role: &str) -> Verifier {
        let iterations = self.seen_iterations.load(Ordering::Relaxed);
        Verifier::mock(&self.mock_key, role, iterations)
    }

    /// The secret `role` may log in with now: none when it is expired, or when it
    /// is a SCRAM verifier with more iterations than `auth.max_scram_iterations`.
    pub fn usable_secret<'a>(&self, name: &str, role: &'a Role) -> Option<&'a Secret> {
        let secret = role.usable_secret(SystemTime::now())?;
        if let Secret::Scram(v) = secret {
            if v.iterations > self.max_iterations {
                warn!(
                    role = name,
                    iterations = v.iterations,
                    max = self.max_iterations,
                    "the role's SCRAM verifier has more iterations than \
                     auth.max_scram_iterations; its logins are refused"
                );
                return None;
            }
            self.seen_iterations.store(v.iterations, Ordering::Relaxed);
        }
        Some(secret)
    }

    /// `auth.max_scram_iterations`: also the most a branch server may ask of the
    /// proxy when it logs in with a password.
    pub fn max_iterations(&self) -> u32 {
        self.max_iterations
    }

    /// Re-reads the users file (on SIGHUP). A file that does not load keeps the
    /// previous contents.
    pub fn reload(&self) {
        let Some(path) = &self.users_file else { return };
        match read_users_file(path) {
            Ok(users) => {
                let n = users.len();
                *self.users.write().unwrap_or_else(|p| p.into_inner()) = users;
                info!(path = %path.display(), roles = n, "users file reloaded");
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "users file reload failed; keeping the previous one")
            }
        }
    }
}

/// The key of the mock verifiers: 32 random bytes kept in `path` (mode 0600,
/// created on first use), so unknown roles keep their mock salts across restarts.
/// A file others may read, or a link, is refused.
pub fn load_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    let shown = path.display();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nofollow)
        .open(path)
    {
        Ok(mut f) => {
            let key: [u8; 32] = rand::random();
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(|e| anyhow::anyhow!("cannot write {shown}: {e}"))?;
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(anyhow::anyhow!("cannot create {shown}: {e}")),
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {shown} (a link is refused): {e}"))?;
    let meta = f
        .metadata()
        .map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return Err(anyhow::anyhow!(
            "{shown} must be a regular file only its owner can read (chmod 600)"
        ));
    }
    let mut key = [0u8; 32];
    let mut rest = Vec::new();
    f.read_exact(&mut key)
        .and_then(|()| f.read_to_end(&mut rest))
        .map_err(|e| anyhow::anyhow!("cannot read {shown}: {e}"))?;
    if !rest.is_empty() {
        return Err(anyhow::anyhow!("{shown} is not a key of 32 bytes"));
    }
    Ok(key)
}

/// Reads `"role" "verifier"` lines; `;` and `#` start comments. Doubled quotes
/// inside a quoted field stand for one.
pub fn read_users_file(path: &Path) -> anyhow::Result<HashMap<String, Secret>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("auth.users_file: cannot read {}: {e}", path.display()))?;
    parse_users(&text).map_err(|(line, why)| {
        anyhow::anyhow!("auth.users_file: {} line {line}: {why}", path.display())
    })
}

/// Parses the users file format; the error is (line number, problem).
pub fn parse_users(text: &str) -> Result<HashMap<String, Secret>, (usize, String)> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let fields = quoted_fields(line).ok_or((i + 1, "expected \"role\" \"verifier\"".into()))?;
        let [role, secret] = fields.as_slice() else {
            return Err((i + 1, "expected exactly two quoted fields".into()));
        };
        let secret = Secret::parse(secret).ok_or((
            i + 1,
            format!("the password of {role:?} is not a SCRAM-SHA-256 or md5 verifier"),
        ))?;
        users.insert(role.clone(), secret);
    }
    Ok(users)
}

fn quoted_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.next() {
            None => return Some(fields),
            Some('"') => {}
            Some(_) => return None,
        }
        let mut field = String::new();
        loop {
            match chars.next()? {
                '"' if chars.next_if_eq(&'"').is_some() => field.push('"'),
                '"' => break,
                c => field.push(c),
            }
        }
        fields.push(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
        WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn users_file_lines() {
        let text = format!(
            "; comment\n\"app\" \"{VERIFIER}\"\n# another\n\"we\"\"ird\" \"md5{}\"\n",
            "0123456789abcdef0123456789ABCDEF"
        );
        let users = parse_users(&text).unwrap();
        assert!(matches!(users["app"], Secret::Scram(_)));
        assert!(matches!(users["we\"ird"], Secret::Md5(_)));
        assert_eq!(parse_users("\"app\" \"plain\"\n").unwrap_err().0, 1);
        assert_eq!(parse_users("\n\"app\"\n").unwrap_err().0, 2);
        assert!(parse_users("app secret\n").is_err());
    }

    #[test]
    fn md5_matches_postgres() {
        // SELECT 'md5' || md5('secret' || 'app')
        assert_eq!(
            md5_password("secret", "app"),
            "md56a422f785c9e20873908ce25d1736ae2"
        );
        let s = Secret::parse("md56A422F785C9E20873908CE25D1736AE2").unwrap();
        assert!(s.check_password("app", "secret"));
        assert!(!s.check_password("app", "Secret"));
        assert!(!s.check_password("other", "secret"));
    }

    #[test]
    fn the_mock_key_is_kept_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.key");
        let first = load_secret(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_secret(&path).unwrap(), first, "stable across restarts");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_secret(&path)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(load_secret(&link).is_err(), "a link is never followed");
    }

    #[test]
    fn verifiers_over_the_iteration_cap_are_not_usable() {
        let creds =
            Credentials::new("SELECT $1".into(), None, Vec::new(), [7; 32], 10_000).unwrap();
        let role = |iterations| Role {
            secret: Some(Secret::Scram(Verifier::from_password(
                "pw", b"salt", iterations,
            ))),
            can_login: true,
            valid_until: None,
        };
        assert_eq!(creds.mock("nobody").iterations, scram::DEFAULT_ITERATIONS);
        assert!(creds.usable_secret("big", &role(20_000)).is_none());
        assert_eq!(creds.mock("nobody").iterations, scram::DEFAULT_ITERATIONS);
        assert!(creds.usable_secret("ok", &role(5_000)).is_some());
        assert_eq!(
            creds.mock("nobody").iterations,
            5_000,
            "mock verifiers follow the real ones"
        );
    }

    #[test]
    fn md5_challenges_from_the_hash_match_the_password() {
        let stored = md5_password("secret", "app");
        let salt = [1, 2, 3, 4];
        assert_eq!(
            md5_challenge_from_hash(&stored, salt),
            md5_challenge("secret", "app", salt)
        );
        assert_ne!(
            md5_challenge_from_hash(&stored, salt),
            md5_challenge("secret", "app", [4, 3, 2, 1])
        );
    }

    #[test]
    fn expired_roles_have_no_usable_secret() {
        let role = Role {
            secret: Secret::parse(VERIFIER),
            can_login: true,
            valid_until: Some(SystemTime::UNIX_EPOCH),
        };
        assert!(role.usable_secret(SystemTime::now()).is_none());
        let role = Role {
            valid_until: None,
            ..role
        };
        assert!(role.usable_secret(SystemTime::now()).is_some());
    }
}
