//! Who may use the admin API: the check every request passes before its handler.
//!
//! A browser on the operator's machine can reach a loopback port, so the API
//! assumes any web page may send it requests. In order:
//!
//! 1. `Host` must be a loopback name or address, the `listen` address, or one of
//!    `admin.allowed_hosts` (421 otherwise). A DNS-rebound page sends its own name.
//! 2. A request a browser sends on behalf of another site is refused (403): an
//!    `Origin` that is not this Host, or `Sec-Fetch-Site: cross-site`/`same-site`.
//! 3. The bearer token: every write, and every read unless `admin.public_read`
//!    (401, compared in constant time).
//! 4. Writes carry `Content-Type: application/json` (415), which a page cannot send
//!    to another origin without a preflight, and the API answers no preflight.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::token::AdminToken;
use crate::config::AdminConfig;

/// The admin API's access rules, built once from `[admin]`.
pub struct Guard {
    token: AdminToken,
    public_read: bool,
    /// Lowercase names (and addresses) accepted in `Host`, besides loopback ones.
    hosts: Vec<String>,
}

/// Why a request was refused: the status and a message for the person sending it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"offshoot\""),
            );
        }
        resp
    }
}

fn refuse(status: StatusCode, msg: impl Into<String>) -> Refusal {
    Refusal(status, msg.into())
}

/// `host[:port]` split into a lowercase host (IPv6 without brackets) and the port.
fn authority(text: &str) -> Option<(String, Option<u16>)> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some((host, port))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Guard {
    pub fn new(cfg: &AdminConfig, token: AdminToken) -> Self {
        let mut hosts: Vec<String> = cfg
            .allowed_hosts
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        if !cfg.listen.ip().is_unspecified() {
            hosts.push(cfg.listen.ip().to_string());
        }
        Self {
            token,
            public_read: cfg.public_read,
            hosts,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        host == "localhost"
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.hosts.iter().any(|h| h == host)
    }

    /// Decides whether a request with `method` and `headers` may reach its handler.
    pub fn admit(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host_header = header_str(headers, header::HOST).unwrap_or("");
        let Some((host, port)) = authority(host_header) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "a Host header (host[:port]) is required",
            ));
        };
        if !self.host_allowed(&host) {
            return Err(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this admin API does not answer to host {host:?}; use a loopback \
                     address, or add the name to admin.allowed_hosts"
                ),
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .and_then(|(scheme, rest)| {
                    let (o_host, o_port) = authority(rest)?;
                    let default = if scheme.eq_ignore_ascii_case("https") {
                        443
                    } else {
                        80
                    };
                    Some(o_host == host && o_port.unwrap_or(default) == port.unwrap_or(80))
                })
                .unwrap_or(false);
            if !same {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "cross-site request refused: its Origin is not this admin API",
                ));
            }
        }
        if let Some(site) = header_str(headers, header::HeaderName::from_static("sec-fetch-site")) {
            if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "cross-site request refused (Sec-Fetch-Site)",
                ));
            }
        }
        let read = method == Method::GET || method == Method::HEAD;
        if !(read && self.public_read) {
            let presented = header_str(headers, header::AUTHORIZATION)
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim());
            match presented {
                None => {
                    return Err(refuse(
                        StatusCode::UNAUTHORIZED,
                        "the admin API needs its token: send `Authorization: Bearer <token>` \
                         (the token is in admin.token_file, or <state.dir>/admin.token; the \
                         CLI reads it from there, from --token-file or OFFSHOOT_ADMIN_TOKEN)",
                    ))
                }
                Some(t) if !self.token.matches(t) => {
                    return Err(refuse(StatusCode::UNAUTHORIZED, "wrong admin token"))
                }
                Some(_) => {}
            }
        }
        if !read {
            let json = header_str(headers, header::CONTENT_TYPE)
                .map(|v| v.split(';').next().unwrap_or("").trim())
                .is_some_and(|m| m.eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "requests that change something must have Content-Type: application/json",
                ));
            }
        }
        Ok(())
    }
}

/// The axum middleware around every route.
pub async fn check(
    State(guard): State<std::sync::Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    match guard.admit(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::info!(
                method = %req.method(),
                path = %req.uri().path(),
                status = refusal.0.as_u16(),
                reason = %refusal.1,
                "admin request refused"
            );
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn guard(public_read: bool, allowed: &[&str]) -> Guard {
        let cfg = AdminConfig {
            public_read,
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Guard::new(&cfg, AdminToken::new(TOKEN))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn status(g: &Guard, method: Method, pairs: &[(&str, &str)]) -> u16 {
        match g.admit(&method, &headers(pairs)) {
            Ok(()) => 200,
            Err(r) => r.0.as_u16(),
        }
    }

    const AUTH: (&str, &str) = ("authorization", "Bearer 0123456789abcdef0123456789abcdef");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn hosts_are_loopback_listen_or_configured() {
        let g = guard(false, &["offshoot"]);
        for host in [
            "localhost:9187",
            "127.0.0.1:9187",
            "[::1]:9187",
            "LOCALHOST",
            "offshoot:9187",
            "127.0.0.2",
        ] {
            assert_eq!(
                status(&g, Method::GET, &[("host", host), AUTH]),
                200,
                "{host}"
            );
        }
        for host in [
            "evil:9187",
            "evil.localhost",
            "127.0.0.1.evil.com",
            "10.0.0.1",
        ] {
            assert_eq!(
                status(&g, Method::GET, &[("host", host), AUTH]),
                421,
                "{host}"
            );
        }
        assert_eq!(status(&g, Method::GET, &[AUTH]), 400);
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let g = guard(false, &[]);
        let base = [("host", "127.0.0.1:9187"), AUTH, JSON];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            status(&g, Method::POST, &v)
        };
        assert_eq!(with(("origin", "http://evil")), 403);
        assert_eq!(with(("origin", "null")), 403);
        assert_eq!(with(("origin", "http://127.0.0.1:8080")), 403);
        assert_eq!(with(("origin", "http://127.0.0.1:9187")), 200);
        assert_eq!(with(("sec-fetch-site", "cross-site")), 403);
        assert_eq!(with(("sec-fetch-site", "same-site")), 403);
        assert_eq!(with(("sec-fetch-site", "same-origin")), 200);
        assert_eq!(with(("sec-fetch-site", "none")), 200);
    }

    #[test]
    fn the_token_guards_writes_and_reads_unless_public() {
        let host = ("host", "localhost");
        let g = guard(false, &[]);
        assert_eq!(status(&g, Method::GET, &[host]), 401);
        assert_eq!(
            status(&g, Method::GET, &[host, ("authorization", "Bearer wrong")]),
            401
        );
        assert_eq!(
            status(&g, Method::GET, &[host, ("authorization", TOKEN)]),
            401,
            "the Bearer scheme is required"
        );
        assert_eq!(status(&g, Method::GET, &[host, AUTH]), 200);
        let public = guard(true, &[]);
        assert_eq!(status(&public, Method::GET, &[host]), 200);
        assert_eq!(status(&public, Method::POST, &[host, JSON]), 401);
        assert_eq!(status(&public, Method::DELETE, &[host, JSON]), 401);
    }

    #[test]
    fn writes_must_be_json() {
        let g = guard(false, &[]);
        let host = ("host", "localhost");
        assert_eq!(status(&g, Method::POST, &[host, AUTH]), 415);
        assert_eq!(
            status(
                &g,
                Method::POST,
                &[host, AUTH, ("content-type", "text/plain")]
            ),
            415
        );
        assert_eq!(status(&g, Method::DELETE, &[host, AUTH]), 415);
        assert_eq!(
            status(
                &g,
                Method::POST,
                &[
                    host,
                    AUTH,
                    ("content-type", "application/json; charset=utf-8")
                ]
            ),
            200
        );
    }
}
