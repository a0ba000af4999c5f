//! The first check every request to the admin listener passes, before the token.
//!
//! A browser on the operator's machine can reach a loopback port, so the listener
//! assumes any web page may send it requests. In order:
//!
//! 1. `Host` must be a loopback name or address, the `listen` address, or one of
//!    `admin.allowed_hosts` (421 otherwise). A DNS-rebound page sends its own name.
//! 2. A request a browser sends on behalf of another site is refused (403): an
//!    `Origin` that is not this Host, or `Sec-Fetch-Site: cross-site`/`same-site`
//!    (except a plain link followed to a console page, which changes nothing).
//! 3. API writes carry `Content-Type: application/json` (415), which a page cannot
//!    send to another origin without a CORS preflight, and none is ever answered.
//!
//! The token itself (every write, and reads unless `admin.public_read`) is checked
//! next by the console's gate, which also knows the console's login sessions; a 401
//! it gives leaves here with `WWW-Authenticate: Bearer`.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::AdminConfig;
use crate::error::ApiError;

/// The admin listener's Host and cross-site rules, built once from `[admin]`.
pub struct Guard {
    /// Lowercase names (and addresses) accepted in `Host`, besides loopback ones.
    hosts: Vec<String>,
}

/// Why a request was refused: the status and a message for the person sending it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        ApiError::new(self.0, self.1).into_response()
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
    pub fn new(cfg: &AdminConfig) -> Self {
        let mut hosts: Vec<String> = cfg
            .allowed_hosts
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        if !cfg.listen.ip().is_unspecified() {
            hosts.push(cfg.listen.ip().to_string());
        }
        Self { hosts }
    }

    fn host_allowed(&self, host: &str) -> bool {
        host == "localhost"
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            || self.hosts.iter().any(|h| h == host)
    }

    /// Decides whether a request may go on to the token check and its handler.
    pub fn admit(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
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
        let read = method == Method::GET || method == Method::HEAD;
        let api = path.starts_with("/api/");
        let navigation = read
            && !api
            && header_str(headers, header::HeaderName::from_static("sec-fetch-mode"))
                .is_some_and(|m| m.eq_ignore_ascii_case("navigate"));
        let other_site = header_str(headers, header::HeaderName::from_static("sec-fetch-site"))
            .is_some_and(|s| {
                s.eq_ignore_ascii_case("cross-site") || s.eq_ignore_ascii_case("same-site")
            });
        if other_site && !navigation {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "cross-site request refused (Sec-Fetch-Site)",
            ));
        }
        if !read && api {
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

/// The axum middleware around every route (outside the console's token gate).
pub async fn check(
    State(guard): State<std::sync::Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    match guard.admit(req.method(), req.uri().path(), req.headers()) {
        Ok(()) => {
            let mut resp = next.run(req).await;
            if resp.status() == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"offshoot\""),
                );
            }
            resp
        }
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

    fn guard(allowed: &[&str]) -> Guard {
        let cfg = AdminConfig {
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Guard::new(&cfg)
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

    fn status(g: &Guard, method: Method, path: &str, pairs: &[(&str, &str)]) -> u16 {
        match g.admit(&method, path, &headers(pairs)) {
            Ok(()) => 200,
            Err(r) => r.0.as_u16(),
        }
    }

    const JSON: (&str, &str) = ("content-type", "application/json");
    const API: &str = "/api/v1/branches";

    #[test]
    fn hosts_are_loopback_listen_or_configured() {
        let g = guard(&["offshoot"]);
        for host in [
            "localhost:9187",
            "127.0.0.1:9187",
            "[::1]:9187",
            "LOCALHOST",
            "offshoot:9187",
            "127.0.0.2",
        ] {
            assert_eq!(
                status(&g, Method::GET, API, &[("host", host)]),
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
                status(&g, Method::GET, API, &[("host", host)]),
                421,
                "{host}"
            );
            assert_eq!(
                status(&g, Method::GET, "/", &[("host", host)]),
                421,
                "{host}"
            );
        }
        assert_eq!(status(&g, Method::GET, API, &[]), 400);
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let g = guard(&[]);
        let with = |method: Method, path: &str, extra: &[(&'static str, &'static str)]| {
            let mut v = vec![("host", "127.0.0.1:9187"), JSON];
            v.extend_from_slice(extra);
            status(&g, method, path, &v)
        };
        assert_eq!(with(Method::POST, API, &[("origin", "http://evil")]), 403);
        assert_eq!(with(Method::GET, API, &[("origin", "http://evil")]), 403);
        assert_eq!(with(Method::POST, API, &[("origin", "null")]), 403);
        assert_eq!(
            with(Method::POST, API, &[("origin", "http://127.0.0.1:8080")]),
            403
        );
        assert_eq!(
            with(Method::POST, API, &[("origin", "http://127.0.0.1:9187")]),
            200
        );
        assert_eq!(
            with(Method::POST, API, &[("sec-fetch-site", "cross-site")]),
            403
        );
        assert_eq!(
            with(Method::POST, API, &[("sec-fetch-site", "same-site")]),
            403
        );
        assert_eq!(
            with(Method::GET, API, &[("sec-fetch-site", "cross-site")]),
            403
        );
        assert_eq!(
            with(Method::POST, API, &[("sec-fetch-site", "same-origin")]),
            200
        );
        assert_eq!(with(Method::POST, API, &[("sec-fetch-site", "none")]), 200);
        // A link to a console page, followed from another site, only shows the page.
        let link = [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate"),
        ];
        assert_eq!(with(Method::GET, "/branches", &link), 200);
        assert_eq!(with(Method::GET, API, &link), 403);
        assert_eq!(with(Method::POST, "/logout", &link), 403);
    }

    #[test]
    fn api_writes_must_be_json() {
        let g = guard(&[]);
        let host = ("host", "localhost");
        assert_eq!(status(&g, Method::POST, API, &[host]), 415);
        let plain = ("content-type", "text/plain");
        assert_eq!(status(&g, Method::POST, API, &[host, plain]), 415);
        assert_eq!(
            status(&g, Method::DELETE, "/api/v1/branches/s/b", &[host]),
            415
        );
        let utf8 = ("content-type", "application/json; charset=utf-8");
        assert_eq!(status(&g, Method::POST, API, &[host, utf8]), 200);
        // The console's login form is a form; the gate and SameSite guard it.
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert_eq!(status(&g, Method::POST, "/login", &[host, form]), 200);
    }
}
