//! The web console: pages served by the admin listener at `/`, drawn on the server
//! from the registry and the in-memory history, with a little JavaScript that
//! refreshes the branch table from the JSON API and calls that API for actions.
//! Assets are compiled into the binary; nothing is fetched at run time.
//!
//! - [`pages`]: the HTML of each page.
//! - [`chart`]: the inline SVG charts.
//! - [`rehearsals`]: the stored rehearsal reports and their probe timelines.
//! - [`session`]: the token check, the login cookie and the CSRF rules, applied to
//!   every route of the admin listener (API included).
//!
//! The console shows only what the API can do: an action the caller may not take,
//! or a source's engine cannot, has no button.

pub mod chart;
mod pages;
pub(crate) mod rehearsals;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::branch::{BranchView, Registry};
use crate::config::RouteBy;
use crate::error::ApiError;
use crate::history::{History, Reading, Totals};
use crate::metrics::Metrics;
use crate::names::{BranchId, BranchName, SourceName};
pub use session::{Access, Gate};

/// How clients reach the proxy, for the connection strings the console shows.
#[derive(Debug, Clone)]
pub struct Reach {
    /// The address clients connect to (a wildcard listener shows as loopback).
    pub addr: SocketAddr,
    pub route_by: RouteBy,
    pub separator: String,
    /// The role shown for branches that record no creator.
    pub user: String,
}

/// How to connect to one branch, ready to copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Connection {
    /// A URL for psql and most drivers: `postgres://user@host:port/db`.
    pub url: String,
    /// libpq keywords: `host=... port=... dbname=... user=...`.
    pub libpq: String,
    /// A JDBC URL.
    pub jdbc: String,
}

impl Reach {
    /// The connection strings of branch `v` (its creator's role, else the
    /// configured one), for the way this proxy routes.
    pub fn connection(&self, v: &BranchView) -> Connection {
        let role = v.created_by.as_deref().unwrap_or(&self.user);
        let (user, db) = match self.route_by {
            RouteBy::Database => (
                role.to_owned(),
                format!("{}{}{}", v.source, self.separator, v.branch),
            ),
            RouteBy::User => (
                format!("{role}{}{}", self.separator, v.branch),
                v.source.clone(),
            ),
        };
        let (host, port) = (self.addr.ip(), self.addr.port());
        let url_host = if host.is_ipv6() {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Connection {
            url: format!("postgres://{user}@{url_host}:{port}/{db}"),
            libpq: format!("host={host} port={port} dbname={db} user={user}"),
            jdbc: format!("jdbc:postgresql://{url_host}:{port}/{db}?user={user}"),
        }
    }
}

/// What the console's pages read.
pub struct Console {
    pub registry: Arc<Registry>,
    pub history: Arc<History>,
    pub reach: Reach,
    pub gate: Arc<Gate>,
    /// `<state.dir>/rehearsals/`: the stored rehearsal reports.
    pub rehearsals: std::path::PathBuf,
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &[u8] = include_bytes!("assets/icon.svg");

/// The console's routes (pages, login, assets).
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/branches", get(branches))
        .route("/branches/{source}/{branch}", get(detail))
        .route("/events", get(events))
        .route("/charts", get(charts))
        .route("/charts/panel", get(charts_panel))
        .route("/rehearsals", get(rehearsals::list))
        .route("/rehearsals/{id}", get(rehearsals::show))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(|| asset("text/css", CSS)))
        .route("/assets/console.js", get(|| asset("text/javascript", JS)))
        .route("/assets/icon.svg", get(|| asset("image/svg+xml", ICON)))
        .with_state(console)
}

async fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body.into(),
    )
        .into_response()
}

type Shared = State<Arc<Console>>;

async fn overview(State(c): Shared, Extension(access): Extension<Access>) -> Html<String> {
    Html(pages::overview(&c, access).await)
}

async fn branches(State(c): Shared, Extension(access): Extension<Access>) -> Html<String> {
    Html(pages::branches(&c, access))
}

async fn detail(
    State(c): Shared,
    Extension(access): Extension<Access>,
    Path((source, branch)): Path<(String, String)>,
) -> Response {
    let id = match (SourceName::new(&source), BranchName::new(&branch)) {
        (Ok(source), Ok(branch)) => BranchId { source, branch },
        (Err(e), _) | (_, Err(e)) => {
            return pages::not_found(&c, access, &e.to_string()).into_response();
        }
    };
    match c.registry.view(&id) {
        Some(view) => Html(pages::detail(&c, access, &view)).into_response(),
        None => pages::not_found(
            &c,
            access,
            &format!("Branch {id} does not exist (any more). Branches that are not persistent are removed after being idle."),
        )
        .into_response(),
    }
}

async fn events(State(c): Shared, Extension(access): Extension<Access>) -> Html<String> {
    Html(pages::events(&c, access))
}

async fn charts(State(c): Shared, Extension(access): Extension<Access>) -> Html<String> {
    Html(pages::charts(&c, access))
}

async fn charts_panel(State(c): Shared) -> Html<String> {
    Html(pages::charts_panel(&c))
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(
    State(c): Shared,
    Extension(access): Extension<Access>,
    Query(q): Query<LoginQuery>,
) -> Html<String> {
    let next = session::encode_next(q.next.as_deref().unwrap_or("/"));
    Html(pages::login(&c, access, &next))
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

/// Exchanges the admin token for a session cookie.
async fn login(
    State(c): Shared,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<LoginBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "send the token as JSON: {\"token\": \"...\"}",
        )
        .into_response();
    };
    if !c.gate.has_token() {
        return ApiError::new(
            StatusCode::CONFLICT,
            "this server has no admin token: nothing to log in to",
        )
        .into_response();
    }
    let addr = peer.map(|Extension(ConnectInfo(a))| a.ip());
    match c.gate.login_from(addr, body.token.trim()) {
        Ok(id) => (
            StatusCode::NO_CONTENT,
            [(header::SET_COOKIE, session::set_cookie(&id))],
        )
            .into_response(),
        Err(session::LoginRefused::Wrong) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "that is not the admin token").into_response()
        }
        Err(session::LoginRefused::TooMany(wait)) => {
            let secs = wait.as_secs().max(1);
            tracing::warn!(client = ?addr, "console logins throttled after repeated wrong tokens");
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many wrong tokens from here; try again in {secs} s"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            resp
        }
    }
}

async fn logout(State(c): Shared, headers: HeaderMap) -> Response {
    c.gate.logout(&headers);
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, session::clear_cookie())],
    )
        .into_response()
}

/// One reading of the registry's state counts and the creation and resume timings.
pub fn read(registry: &Registry, metrics: &Metrics, at: SystemTime) -> Reading {
    let mut reading = Reading {
        at: at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ..Reading::default()
    };
    for state in chart::STATES {
        reading.states.insert(state.to_owned(), 0);
    }
    for view in registry.list() {
        *reading
            .states
            .entry(view.state.as_str().to_owned())
            .or_default() += 1;
    }
    for src in registry.sources() {
        let name = [src.name.as_str()];
        let add = |t: &mut Totals, h: &prometheus::HistogramVec| {
            let h = h.with_label_values(&name);
            t.count += h.get_sample_count();
            t.sum_secs += h.get_sample_sum();
        };
        add(&mut reading.cold_starts, &metrics.provision_seconds);
        if src.engine.servers().is_some() {
            add(&mut reading.resumes, &metrics.start_seconds);
        }
    }
    reading
}

/// Samples into `history` every `every` until `shutdown`.
pub async fn record_history(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => history.record(read(&registry, &metrics, SystemTime::now())),
        }
    }
}
