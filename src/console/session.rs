//! Who may see and change what through the admin listener: the admin token as a
//! bearer header (CLI, scripts) or, for the console, a session cookie handed out
//! by the login form in exchange for that token.
//!
//! The cookie holds a random session id known only to this process, never the
//! token; it is `HttpOnly` (no script reads it) and `SameSite=Strict` (no other
//! site's page sends it). A write made with the cookie must also carry the
//! console's own request header, which a cross-site form cannot send and a
//! cross-site script could send only after a CORS preflight this server never
//! answers; and a browser that says the request is cross-site is refused.
//! Sessions live in memory: a restart logs everybody out.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The session cookie's name.
pub const COOKIE: &str = "offshoot_session";
/// The header the console's scripts add to every write.
pub const CONSOLE_HEADER: &str = "x-offshoot-console";
/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The window failed logins are counted in.
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Failed logins allowed from one address per window; more are answered 429
/// without looking at the token.
const FAILS_PER_ADDRESS: usize = 5;
/// Failed logins allowed from all addresses together per window (a storm from
/// many addresses); this also bounds the memory the counts take.
const FAILS_TOTAL: usize = 50;
/// Sessions kept at most; the oldest goes first (a flood of logins cannot grow memory).
const MAX_SESSIONS: usize = 1024;

/// What the caller of a request may do; handlers read it to hide what it may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token is configured: everything is open, as on a private loopback listener.
    Open,
    /// Proved the token (bearer header or session cookie).
    Write,
    /// Not logged in, but reads are public (`admin.public_read`).
    ReadOnly,
}

impl Access {
    pub fn can_write(self) -> bool {
        matches!(self, Access::Open | Access::Write)
    }
}

/// The token check and the console's sessions.
pub struct Gate {
    token: Option<String>,
    public_read: bool,
    sessions: Mutex<HashMap<String, Instant>>,
    failures: Mutex<Failures>,
}

/// Recent failed logins, by address and in all.
#[derive(Default)]
struct Failures {
    by_address: HashMap<IpAddr, VecDeque<Instant>>,
    all: VecDeque<Instant>,
}

impl Failures {
    fn forget_before(&mut self, since: Instant) {
        let old = |q: &mut VecDeque<Instant>| {
            while q.front().is_some_and(|t| *t < since) {
                q.pop_front();
            }
        };
        old(&mut self.all);
        self.by_address.retain(|_, q| {
            old(q);
            !q.is_empty()
        });
    }

    /// How long until `addr` may try again, if it is over a limit now.
    fn wait(&self, addr: Option<IpAddr>, now: Instant) -> Option<Duration> {
        let until = |q: &VecDeque<Instant>| {
            q.front()
                .map(|t| (*t + LOGIN_WINDOW).saturating_duration_since(now))
        };
        let mine = addr.and_then(|a| self.by_address.get(&a));
        if let Some(q) = mine.filter(|q| q.len() >= FAILS_PER_ADDRESS) {
            return until(q);
        }
        (self.all.len() >= FAILS_TOTAL)
            .then(|| until(&self.all))
            .flatten()
    }
}

/// Why a login did not give a session.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginRefused {
    /// Not the admin token.
    Wrong,
    /// Too many wrong tokens lately; try again after this long.
    TooMany(Duration),
}

impl Gate {
    /// `token`: the admin token, or `None` for a listener without one.
    pub fn new(token: Option<String>, public_read: bool) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
            public_read,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(Failures::default()),
        }
    }

    /// Whether a login is needed at all.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Compares SHA-256 digests in constant time: they always have the same length,
    /// so a wrong guess takes the same time whatever the token's bytes or length.
    fn token_matches(&self, given: &str) -> bool {
        let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
        self.token
            .as_deref()
            .is_some_and(|t| bool::from(digest(t).as_ref().ct_eq(digest(given).as_ref())))
    }

    /// Checks a token from the login form sent from `addr`, unless that address
    /// (or everybody) has sent too many wrong ones lately; on success returns a new
    /// session id.
    pub fn login_from(&self, addr: Option<IpAddr>, token: &str) -> Result<String, LoginRefused> {
        let now = Instant::now();
        {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            failures.forget_before(now.checked_sub(LOGIN_WINDOW).unwrap_or(now));
            if let Some(wait) = failures.wait(addr, now) {
                return Err(LoginRefused::TooMany(wait));
            }
        }
        match self.login(token) {
            Some(id) => Ok(id),
            None => {
                let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                failures.all.push_back(now);
                if let Some(a) = addr {
                    failures.by_address.entry(a).or_default().push_back(now);
                }
                Err(LoginRefused::Wrong)
            }
        }
    }

    /// Checks a token; on success returns a new session id.
    fn login(&self, token: &str) -> Option<String> {
        if !self.token_matches(token) {
            return None;
        }
        let id =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, expires| *expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), now + SESSION_TTL);
        Some(id)
    }

    pub fn logout(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers) {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.remove(id);
        }
    }

    fn session_valid(&self, id: &str) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.get(id).is_some_and(|e| *e > Instant::now())
    }

    /// How the request proved itself, if it did.
    fn proof(&self, headers: &HeaderMap) -> Proof {
        if self.token.is_none() {
            return Proof::NotNeeded;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(given) = bearer {
            return if self.token_matches(given.trim()) {
                Proof::Bearer
            } else {
                Proof::Wrong
            };
        }
        match cookie(headers) {
            Some(id) if self.session_valid(id) => Proof::Cookie,
            _ => Proof::None,
        }
    }
}

enum Proof {
    NotNeeded,
    Bearer,
    Cookie,
    /// A bearer token that is not the admin token.
    Wrong,
    None,
}

/// The session id in the request's cookies, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value for a new session.
pub fn set_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    ))
    .expect("base64 ids are valid header text")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("offshoot_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Paths anyone may fetch: the login page, its assets, the health check, and the
/// OpenAPI document (the same for every deployment; see `admin::openapi`).
fn is_public(path: &str) -> bool {
    path == "/login"
        || path.starts_with("/assets/")
        || path == "/healthz"
        || path == "/api/v1/openapi.json"
}

/// Pages of the console (as opposed to the API): an unauthenticated read is sent to
/// the login form instead of getting a JSON 401.
fn is_page(path: &str) -> bool {
    !path.starts_with("/api/") && path != "/metrics"
}

/// The middleware in front of every route of the admin listener.
pub async fn check(
    State(gate): State<std::sync::Arc<Gate>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let headers = req.headers();
    if write && cross_site(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site requests are refused; use the console on this server or send the admin token",
        );
    }
    let access = match gate.proof(headers) {
        Proof::NotNeeded => Access::Open,
        Proof::Bearer => Access::Write,
        Proof::Cookie if write && headers.get(CONSOLE_HEADER).is_none() => {
            return refuse(
                StatusCode::FORBIDDEN,
                "a write with the session cookie must come from the console (its request header is missing)",
            );
        }
        Proof::Cookie => Access::Write,
        Proof::Wrong => {
            return refuse(StatusCode::UNAUTHORIZED, "the admin token is wrong");
        }
        Proof::None if is_public(&path) => Access::ReadOnly,
        Proof::None if !write && gate.public_read => Access::ReadOnly,
        Proof::None if is_page(&path) && !write => {
            return Redirect::to(&format!("/login?next={}", encode_next(&path))).into_response();
        }
        Proof::None => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "this needs the admin token: send `Authorization: Bearer <token>` or log in to the console",
            );
        }
    };
    req.extensions_mut().insert(access);
    next.run(req).await
}

/// A browser's own word that the request comes from another site, or an `Origin`
/// that is not this server's.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(fetch_site, Some("cross-site" | "same-site")) {
        return true;
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            origin_host != Some(host)
        }
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Only a path of this server may be the page to return to after logging in.
pub fn encode_next(path: &str) -> String {
    let kept: String = path
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/-_.".contains(*c))
        .collect();
    // One leading slash: `//host` would be another site.
    format!("/{}", kept.trim_start_matches('/'))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    ApiError::new(status, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_session_is_valid_until_logout() {
        let gate = Gate::new(Some("s3cret".into()), false);
        assert!(gate.login("wrong").is_none());
        let id = gate.login("s3cret").expect("right token");
        assert_ne!(id, "s3cret", "the cookie never holds the token");
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={id}"))]);
        assert!(matches!(gate.proof(&h), Proof::Cookie));
        gate.logout(&h);
        assert!(matches!(gate.proof(&h), Proof::None));
    }

    #[test]
    fn a_storm_of_wrong_tokens_is_throttled() {
        let gate = Gate::new(Some("s3cret".into()), false);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..FAILS_PER_ADDRESS {
            assert_eq!(gate.login_from(Some(a), "guess"), Err(LoginRefused::Wrong));
        }
        // Even the right token waits now, from that address; another is not held up.
        assert!(matches!(
            gate.login_from(Some(a), "s3cret"),
            Err(LoginRefused::TooMany(w)) if w <= LOGIN_WINDOW && !w.is_zero()
        ));
        assert!(gate.login_from(Some(b), "s3cret").is_ok());
        // Many addresses together meet the total limit.
        for i in 0..FAILS_TOTAL {
            let addr = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
            let _ = gate.login_from(Some(addr), "guess");
        }
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(matches!(
            gate.login_from(Some(c), "guess"),
            Err(LoginRefused::TooMany(_))
        ));
        assert!(gate.failures.lock().unwrap().by_address.len() <= FAILS_TOTAL);
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let gate = Gate::new(Some("s3cret".into()), false);
        let ok = headers(&[("authorization", "Bearer s3cret")]);
        let bad = headers(&[("authorization", "Bearer nope")]);
        assert!(matches!(gate.proof(&ok), Proof::Bearer));
        assert!(matches!(gate.proof(&bad), Proof::Wrong));
        // A prefix, an extension and an empty token are all wrong.
        for guess in ["s3cre", "s3cret2", ""] {
            assert!(!gate.token_matches(guess), "{guess:?}");
        }
        assert!(gate.login("s3cret").is_some());
        assert!(gate.login("s3cre").is_none());
        let open = Gate::new(None, false);
        assert!(matches!(open.proof(&bad), Proof::NotNeeded));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(cross_site(&headers(&[
            ("origin", "http://evil"),
            ("host", "127.0.0.1:9187")
        ])));
        assert!(!cross_site(&headers(&[
            ("origin", "http://127.0.0.1:9187"),
            ("host", "127.0.0.1:9187"),
            ("sec-fetch-site", "same-origin")
        ])));
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:9187")])));
    }

    #[test]
    fn the_return_path_stays_on_this_server() {
        assert_eq!(encode_next("/branches/shop/pr-1"), "/branches/shop/pr-1");
        assert_eq!(encode_next("//evil.com?x"), "/evil.comx");
        assert_eq!(encode_next("https://evil"), "/https//evil");
    }
}
