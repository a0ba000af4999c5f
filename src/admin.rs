//! The HTTP side: `/metrics`, `/healthz` and the branch API under `/api/v1`; the
//! web console (`crate::console`) is mounted beside them, behind the same gate.
//!
//! Every request passes [`guard`] first (allowed `Host`, no cross-site browser
//! requests, JSON on API writes), then the console's gate, which checks the token
//! ([`token`]) as a bearer header or a console session.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

mod events;
mod guard;
mod lifecycle;
mod rehearsals;
mod reset;
pub mod token;

use crate::branch::{CreateOptions, DeleteError, Registry, RemoveReason, Source};
use crate::error::{mapping, EngineError, ErrorKind, ProvisionError};
use crate::metrics::Metrics;
use crate::names::{BranchId, BranchName, NameError, SourceName};

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    provision_timeout: Duration,
}

/// An API error: status and a JSON body `{"error": "...", "kind": "...", "hint":
/// "..."}`. The message is the client's (never a path or an OS error); the log has
/// the detail.
struct ApiError {
    status: StatusCode,
    message: String,
    /// The metric label of the failure's kind, for scripts.
    kind: Option<ErrorKind>,
    /// What to do about it, when there is something to do.
    hint: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: None,
            hint: None,
        }
    }

    /// An error of `kind`, answered with the status the one mapping gives it.
    fn of_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(mapping(kind).status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            message: message.into(),
            kind: Some(kind),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(kind) = self.kind {
            body["kind"] = kind.as_str().into();
        }
        if let Some(hint) = self.hint {
            body["hint"] = hint.into();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        ApiError::of_kind(e.kind(), e.client_message())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        warn!(error = %e, "admin API request failed");
        ApiError::of_kind(e.kind(), e.client_message())
    }
}

impl From<DeleteError> for ApiError {
    fn from(e: DeleteError) -> Self {
        match e {
            DeleteError::NotFound(id) => {
                ApiError::of_kind(ErrorKind::NotFound, format!("branch {id} does not exist"))
            }
            DeleteError::InUse { id, conns } => ApiError::of_kind(
                ErrorKind::Conflict,
                format!("branch {id} has {conns} open connection(s)"),
            )
            .hint("delete with ?force=true to terminate them"),
            e @ DeleteError::Guarded { .. } => {
                ApiError::of_kind(ErrorKind::Conflict, e.to_string())
                    .hint("delete with ?force=true to remove it anyway")
            }
            DeleteError::Busy(id) => ApiError::of_kind(
                ErrorKind::Busy,
                format!("branch {id} is being created, started, suspended or deleted; try again"),
            ),
            DeleteError::Engine { id, err } => {
                warn!(branch = %id, error = %err, "deletion failed");
                ApiError::of_kind(
                    err.kind(),
                    format!("could not delete branch {id}: {}", err.client_message()),
                )
            }
        }
    }
}

fn unknown_source(state: &AppState, source: &str) -> ApiError {
    ApiError::of_kind(
        ErrorKind::NotFound,
        format!(
            "source \"{source}\" does not exist; configured sources: {}",
            state.registry.source_names().join(", ")
        ),
    )
}

fn branch_id(state: &AppState, source: &str, branch: &str) -> Result<BranchId, ApiError> {
    let source = SourceName::new(source)?;
    if state.registry.source(source.as_str()).is_none() {
        return Err(unknown_source(state, source.as_str()));
    }
    Ok(BranchId {
        source,
        branch: BranchName::new(branch)?,
    })
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "branches": s.registry.list().len(),
        "client_connections": s.metrics.connections_open.get(),
    }))
}

async fn list(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.registry.list())
}

async fn show(
    State(s): State<AppState>,
    Path((source, branch)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let id = branch_id(&s, &source, &branch)?;
    s.registry.view(&id).map(Json).ok_or_else(|| {
        ApiError::of_kind(ErrorKind::NotFound, format!("branch {id} does not exist"))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    source: String,
    branch: String,
    #[serde(default)]
    persistent: bool,
    /// Snapshot to clone (sources with snapshots); default the newest.
    #[serde(default)]
    snapshot: Option<String>,
    /// When it exists: `reuse` (200 with it, the default) or `fail` (409).
    #[serde(default)]
    if_exists: crate::branch::IfExists,
    /// Removed this long after creation ("3d"), or at `expires_at` (RFC 3339).
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    /// Overrides its policy's `protected`; `protected_until` (RFC 3339) implies it.
    #[serde(default)]
    protected: Option<bool>,
    #[serde(default)]
    protected_until: Option<String>,
}

async fn create(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let id = branch_id(&s, &body.source, &body.branch)?;
    let mut opts = CreateOptions {
        persistent: body.persistent,
        snapshot: body.snapshot,
        if_exists: body.if_exists,
        actor,
        ..CreateOptions::default()
    };
    let persistent = body.persistent
        || source_of(&s, &body.source)?
            .config
            .policy(&id.branch)
            .persistent;
    let lifecycle = lifecycle::CreateLifecycle {
        ttl: body.ttl,
        expires_at: body.expires_at,
        protected: body.protected,
        protected_until: body.protected_until,
    };
    lifecycle.apply(s.registry.clock().now(), persistent, &mut opts)?;
    let (view, created) = s.registry.ensure(&id, &opts, s.provision_timeout).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path((source, branch)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let id = branch_id(&s, &source, &branch)?;
    s.registry
        .delete_by(&id, q.force, RemoveReason::Api, actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stops a branch's server now (scale to zero); the next connection starts it.
async fn suspend(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path((source, branch)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let id = branch_id(&s, &source, &branch)?;
    let src = source_of(&s, &source)?;
    if src.engine.servers().is_none() {
        return Err(ApiError::of_kind(
            ErrorKind::Unsupported,
            format!(
                "the engine of source {} does not suspend branches: its clones live on \
                 the source's own server, with no server of their own to stop",
                src.name
            ),
        ));
    }
    let suspended = s.registry.suspend_by(&id, actor).await?;
    let view = s.registry.view(&id).ok_or_else(|| {
        ApiError::of_kind(ErrorKind::NotFound, format!("branch {id} does not exist"))
    })?;
    if !suspended && view.state != crate::branch::Phase::Suspended {
        return Err(ApiError::of_kind(
            ErrorKind::Conflict,
            format!(
                "branch {id} is {} with {} connection(s); only a ready branch nobody is \
                 connected to can be suspended",
                view.state.as_str(),
                view.connections
            ),
        ));
    }
    Ok(Json(view))
}

fn source_of<'a>(state: &'a AppState, source: &str) -> Result<&'a Source, ApiError> {
    let name = SourceName::new(source)?;
    state
        .registry
        .source(name.as_str())
        .ok_or_else(|| unknown_source(state, source))
}

async fn list_snapshots(
    State(s): State<AppState>,
    Path(source): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let src = source_of(&s, &source)?;
    let mut list = src.engine.snapshots().await?;
    // The engine may not know which branches came from a snapshot; the records do.
    for snap in &mut list {
        snap.branches
            .extend(s.registry.snapshot_users(&src.name, &snap.name));
        snap.branches.sort();
        snap.branches.dedup();
    }
    Ok(Json(list))
}

async fn take_snapshot(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path(source): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let src = source_of(&s, &source)?;
    let info = s.registry.take_snapshot(&src.name, actor).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete_snapshot(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path((source, name)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let src = source_of(&s, &source)?;
    // The registry refuses a snapshot in use, under the lock that starts creations.
    s.registry
        .delete_snapshot_by(&src.name, &name, actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn orphans(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.registry.orphans())
}

async fn sources(State(s): State<AppState>) -> impl IntoResponse {
    let list: Vec<_> = s
        .registry
        .sources()
        .map(|src| {
            json!({
                "name": src.name.as_str(),
                "engine": src.config.engine.kind(),
                "database": src.config.database_name(src.name.as_str()),
                "default_branch": src.config.default_branch,
                "idle_expire": src.config.idle_expire.map(|d| humantime::format_duration(d).to_string()),
                "max_branches": src.config.max_branches,
                "suspend_after": src.engine.servers().is_some().then(|| src.config.suspend_after().map(|d| humantime::format_duration(d).to_string())).flatten(),
                "persistent": src.config.persistent,
                "clone_strategy": src.config.clone_strategy(),
                "copy_mode": src.engine.copy_mode(),
            })
        })
        .collect();
    Json(list)
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/v1/sources", get(sources))
        .route("/api/v1/branches", get(list).post(create))
        .route(
            "/api/v1/branches/{source}/{branch}",
            get(show).delete(delete).patch(lifecycle::patch),
        )
        .route(
            "/api/v1/branches/{source}/{branch}/suspend",
            axum::routing::post(suspend),
        )
        .route(
            "/api/v1/branches/{source}/{branch}/reset",
            axum::routing::post(reset::reset),
        )
        .route(
            "/api/v1/sources/{source}/snapshots",
            get(list_snapshots).post(take_snapshot),
        )
        .route(
            "/api/v1/sources/{source}/snapshots/{name}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/api/v1/orphans", get(orphans))
        .route("/api/v1/events", get(events::list))
        .route(
            "/api/v1/rehearsals/recording/{source}/{branch}",
            get(rehearsals::recording).delete(rehearsals::drop_recording),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            events::sync_writes,
        ))
        .with_state(state)
}

/// The bound admin listener and the access rules it serves under.
pub struct Bound {
    listener: TcpListener,
    guard: Arc<guard::Guard>,
    gate: Arc<crate::console::Gate>,
    token_path: std::path::PathBuf,
}

impl Bound {
    /// The token check (bearer header or console session), for the console.
    pub fn gate(&self) -> Arc<crate::console::Gate> {
        self.gate.clone()
    }

    /// Where the token is, for the start-up banner.
    pub fn token_path(&self) -> &std::path::Path {
        &self.token_path
    }
}

/// Reads (or makes) the token and binds the admin address, so a bad token file or
/// a taken port fails the start, not later.
pub async fn bind(cfg: &crate::config::Config) -> anyhow::Result<Bound> {
    let (secret, path) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || token::load_or_create(&cfg)).await??
    };
    // `serve` repeats the path in its banner (text logs only: JSON logs stay one
    // object per line).
    tracing::info!(path = %path.display(), "admin API token");
    let addr = cfg.admin.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin.listen: cannot bind {addr}: {e}"))?;
    Ok(Bound {
        listener,
        guard: Arc::new(guard::Guard::new(&cfg.admin)),
        gate: Arc::new(crate::console::Gate::new(
            Some(secret),
            cfg.admin.public_read,
        )),
        token_path: path,
    })
}

/// Serves until `shutdown`.
pub async fn serve(
    bound: Bound,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    provision_timeout: Duration,
    console: Arc<crate::console::Console>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = AppState {
        registry,
        metrics,
        provision_timeout,
    };
    // The guard (Host, cross-site, JSON writes) runs first; then the console's gate
    // checks the token (bearer header, or the console's session cookie).
    let gate = console.gate.clone();
    let app = router(state)
        .merge(crate::console::router(console))
        .layer(axum::middleware::from_fn_with_state(
            gate,
            crate::console::session::check,
        ))
        .layer(axum::middleware::from_fn_with_state(
            bound.guard,
            guard::check,
        ));
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(bound.listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
