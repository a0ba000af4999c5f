//! The HTTP side: `/metrics`, `/healthz` and the branch API under `/api/v1`; the
//! web console (`crate::console`) is mounted beside them, behind the same gate.
//!
//! Every request passes [`guard`] first (allowed `Host`, no cross-site browser
//! requests, JSON on API writes), then the console's gate, which checks the token
//! ([`token`]) as a bearer header or a console session.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

mod branch_path;
mod errors;
mod events;
mod guard;
mod lifecycle;
mod openapi;
mod rehearsal_run;
mod rehearsals;
mod reset;
pub mod token;

use crate::branch::engine::{CopyMode, SnapshotInfo};
use crate::branch::registry::Orphan;
use crate::branch::{BranchView, CreateOptions, Registry, RemoveReason, Source};
use crate::config::{CloneStrategy, EngineKind};
use crate::console::{Connection, Reach};
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::metrics::Metrics;
use crate::names::SourceName;
use branch_path::BranchPath;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    provision_timeout: Duration,
    /// How clients reach the proxy, for a branch's connection strings.
    reach: Reach,
    /// The stored rehearsal reports and the server-side runs.
    rehearsals: Arc<rehearsal_run::Runner>,
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

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain", body = String),
        (status = 401, description = "No or a wrong token", body = ErrorBody),
    ))]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// The proxy is up: a count of branches and open client connections.
#[derive(Serialize, ToSchema)]
struct Health {
    /// Always `ok` when the proxy answers.
    status: &'static str,
    branches: usize,
    client_connections: i64,
}

/// Liveness check; needs no token.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The proxy is up", body = Health)))]
async fn healthz(State(s): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        branches: s.registry.list().len(),
        client_connections: s.metrics.connections_open.get(),
    })
}

/// This document: the admin API as OpenAPI 3.1, generated from the handlers.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi::document())
}

/// Every branch, in no particular order.
#[utoipa::path(get, path = "/api/v1/branches", operation_id = "list_branches", tag = "branches",
    responses(
        (status = 200, description = "The branches", body = Vec<BranchView>),
        (status = 401, description = "No or a wrong token", body = ErrorBody),
    ))]
async fn list(State(s): State<AppState>) -> Json<Vec<BranchView>> {
    Json(s.registry.list())
}

/// One branch, with the strings to connect to it.
#[derive(Serialize, ToSchema)]
struct BranchDetail {
    #[serde(flatten)]
    branch: BranchView,
    connection: Connection,
}

/// One branch, with its connection strings.
#[utoipa::path(get, path = "/api/v1/branches/{source}/{branch}", operation_id = "show_branch", tag = "branches",
    params(BranchPath),
    responses(
        (status = 200, description = "The branch", body = BranchDetail),
        (status = 400, description = "Not a valid source or branch name", body = ErrorBody),
        (status = 404, description = "No such source or branch", body = ErrorBody),
    ))]
async fn show(
    State(s): State<AppState>,
    Path(path): Path<BranchPath>,
) -> Result<Json<BranchDetail>, ApiError> {
    let view = branch_path::view(&s, &path.resolve(&s)?)?;
    Ok(Json(BranchDetail {
        connection: s.reach.connection(&view),
        branch: view,
    }))
}

/// A branch to create ahead of its first connection.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// The source to clone.
    source: String,
    /// The new branch's name.
    branch: String,
    /// Never expire the branch.
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

/// Creates a branch (or finds it made already) and waits until it is ready.
#[utoipa::path(post, path = "/api/v1/branches", operation_id = "create_branch", tag = "branches", request_body = CreateBody,
    responses(
        (status = 201, description = "Created", body = BranchView),
        (status = 200, description = "It existed already", body = BranchView),
        (status = 202, description = "Still being created after the provision timeout", body = ErrorBody),
        (status = 400, description = "A bad name or body", body = ErrorBody),
        (status = 403, description = "Not allowed to create branches of this source", body = ErrorBody),
        (status = 404, description = "No such source or snapshot", body = ErrorBody),
        (status = 409, description = "A quota is reached, or the branch is being deleted", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A JSON body with missing or unknown fields", body = ErrorBody),
        (status = 500, description = "The clone could not be made", body = ErrorBody),
        (status = 503, description = "The proxy is shutting down", body = ErrorBody),
    ))]
async fn create(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<BranchView>), ApiError> {
    let Json(body) = body.map_err(errors::bad_body)?;
    let id = branch_path::branch_id(&s, &body.source, &body.branch)?;
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Terminate the branch's open sessions first.
    #[serde(default)]
    force: bool,
}

/// Deletes a branch; refused while clients are connected unless `force`.
#[utoipa::path(delete, path = "/api/v1/branches/{source}/{branch}", operation_id = "delete_branch", tag = "branches",
    params(BranchPath, DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such source or branch", body = ErrorBody),
        (status = 409, description = "Clients are connected, or the branch is busy", body = ErrorBody),
    ))]
async fn delete(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path(path): Path<BranchPath>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(q) = q.map_err(errors::bad_query)?;
    let id = path.resolve(&s)?;
    s.registry
        .delete_by(&id, q.force, RemoveReason::Api, actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stops a branch's server now (scale to zero); the next connection starts it.
#[utoipa::path(post, path = "/api/v1/branches/{source}/{branch}/suspend", operation_id = "suspend_branch", tag = "branches",
    params(BranchPath),
    responses(
        (status = 200, description = "Suspended (or it was already)", body = BranchView),
        (status = 404, description = "No such source or branch", body = ErrorBody),
        (status = 409, description = "Not ready, in use, or the engine has no servers to stop", body = ErrorBody),
    ))]
async fn suspend(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path(path): Path<BranchPath>,
) -> Result<Json<BranchView>, ApiError> {
    let id = path.resolve(&s)?;
    let src = source_of(&s, id.source.as_str())?;
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
    let view = branch_path::view(&s, &id)?;
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

/// A source's sealed snapshots, oldest first, with the branches made from each.
#[utoipa::path(get, path = "/api/v1/sources/{source}/snapshots", tag = "snapshots",
    params(("source" = String, Path, description = "The source's name")),
    responses(
        (status = 200, description = "The snapshots", body = Vec<SnapshotInfo>),
        (status = 404, description = "No such source", body = ErrorBody),
        (status = 409, description = "The source's engine has no snapshots", body = ErrorBody),
    ))]
async fn list_snapshots(
    State(s): State<AppState>,
    Path(source): Path<String>,
) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    let src = source_of(&s, &source)?;
    let mut list = src.engine.snapshots().await?;
    // The engine may not know which branches came from a snapshot; the records do.
    for snap in &mut list {
        snap.branches
            .extend(s.registry.snapshot_users(&src.name, &snap.name));
        snap.branches.sort();
        snap.branches.dedup();
    }
    // The one being taken, with its phase and bytes copied.
    list.extend(src.engine.snapshot_in_progress());
    Ok(Json(list))
}

/// Copies the source now and seals the copy; new branches start from it.
#[utoipa::path(post, path = "/api/v1/sources/{source}/snapshots", tag = "snapshots",
    params(("source" = String, Path, description = "The source's name")),
    responses(
        (status = 201, description = "Taken", body = SnapshotInfo),
        (status = 404, description = "No such source", body = ErrorBody),
        (status = 409, description = "The source's engine has no snapshots", body = ErrorBody),
        (status = 507, description = "No space left", body = ErrorBody),
    ))]
async fn take_snapshot(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path(source): Path<String>,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    let src = source_of(&s, &source)?;
    let info = s.registry.take_snapshot(&src.name, actor).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Deletes a snapshot no branch was made from.
#[utoipa::path(delete, path = "/api/v1/sources/{source}/snapshots/{name}", tag = "snapshots",
    params(("source" = String, Path, description = "The source's name"),
           ("name" = String, Path, description = "The snapshot's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such source or snapshot", body = ErrorBody),
        (status = 409, description = "Branches were made from it", body = ErrorBody),
    ))]
async fn delete_snapshot(
    State(s): State<AppState>,
    events::ApiActor(actor): events::ApiActor,
    Path((source, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let src = source_of(&s, &source)?;
    // The registry refuses a snapshot in use, under the lock that starts creations.
    s.registry
        .delete_snapshot_by(&src.name, &name, actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the proxy found on disk or on a server that no record explains (never deleted).
#[utoipa::path(get, path = "/api/v1/orphans", tag = "operations",
    responses((status = 200, description = "The orphans", body = Vec<Orphan>)))]
async fn orphans(State(s): State<AppState>) -> Json<Vec<Orphan>> {
    Json(s.registry.orphans())
}

/// A configured source.
#[derive(Serialize, ToSchema)]
struct SourceView {
    name: String,
    engine: EngineKind,
    /// The database clones are made from.
    database: String,
    /// The branch a connection to the bare source name gets.
    default_branch: Option<String>,
    /// How long an unused branch lives (human-readable, e.g. `1day`).
    idle_expire: Option<String>,
    max_branches: usize,
    /// How long a branch's server runs unused (engines with servers).
    suspend_after: Option<String>,
    /// Branches that never expire.
    persistent: Vec<String>,
    /// How `CREATE DATABASE` copies (`database` engine).
    clone_strategy: Option<CloneStrategy>,
    /// How clones' files are made (engines that copy files).
    copy_mode: Option<CopyMode>,
}

/// The configured sources.
#[utoipa::path(get, path = "/api/v1/sources", operation_id = "list_sources", tag = "sources",
    responses((status = 200, description = "The sources", body = Vec<SourceView>)))]
async fn sources(State(s): State<AppState>) -> Json<Vec<SourceView>> {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let list = s
        .registry
        .sources()
        .map(|src| SourceView {
            name: src.name.to_string(),
            engine: src.config.engine.kind(),
            database: src.config.database_name(src.name.as_str()).to_owned(),
            default_branch: src.config.default_branch.as_ref().map(|b| b.to_string()),
            idle_expire: src.config.idle_expire.map(human),
            max_branches: src.config.max_branches,
            suspend_after: src
                .engine
                .servers()
                .and_then(|_| src.config.suspend_after().map(human)),
            persistent: src
                .config
                .persistent
                .iter()
                .map(|b| b.to_string())
                .collect(),
            clone_strategy: src.config.clone_strategy(),
            copy_mode: src.engine.copy_mode(),
        })
        .collect();
    Json(list)
}

/// The API's routes, each recorded with its method as it is added, so the list
/// a test holds against the OpenAPI document is the one the router is built from.
struct Routes {
    router: Router<AppState>,
    list: Vec<(Method, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
        self.router = self.router.route(path, on(filter, handler));
        self.list.push((method, path));
        self
    }
}

/// Every route of the API. A new route goes here, with its handler annotated
/// (`#[utoipa::path]`) and named in [`openapi::ApiDoc`]; a test fails otherwise.
fn routes() -> Routes {
    use Method as M;
    Routes {
        router: Router::new(),
        list: Vec::new(),
    }
    .add(M::GET, "/metrics", metrics)
    .add(M::GET, "/healthz", healthz)
    .add(M::GET, "/api/v1/openapi.json", openapi_json)
    .add(M::GET, "/api/v1/sources", sources)
    .add(M::GET, "/api/v1/branches", list)
    .add(M::POST, "/api/v1/branches", create)
    .add(M::GET, "/api/v1/branches/{source}/{branch}", show)
    .add(M::DELETE, "/api/v1/branches/{source}/{branch}", delete)
    .add(
        M::PATCH,
        "/api/v1/branches/{source}/{branch}",
        lifecycle::patch,
    )
    .add(
        M::POST,
        "/api/v1/branches/{source}/{branch}/suspend",
        suspend,
    )
    .add(
        M::POST,
        "/api/v1/branches/{source}/{branch}/reset",
        reset::reset,
    )
    .add(M::GET, "/api/v1/sources/{source}/snapshots", list_snapshots)
    .add(M::POST, "/api/v1/sources/{source}/snapshots", take_snapshot)
    .add(
        M::DELETE,
        "/api/v1/sources/{source}/snapshots/{name}",
        delete_snapshot,
    )
    .add(M::GET, "/api/v1/orphans", orphans)
    .add(M::GET, "/api/v1/events", events::list)
    .add(M::GET, "/api/v1/rehearsals", rehearsals::list)
    .add(M::POST, "/api/v1/rehearsals", rehearsal_run::start)
    .add(M::POST, "/api/v1/rehearsals/reports", rehearsals::store)
    .add(M::GET, "/api/v1/rehearsals/{id}", rehearsals::show)
    .add(
        M::GET,
        "/api/v1/rehearsals/recording/{source}/{branch}",
        rehearsals::recording,
    )
    .add(
        M::DELETE,
        "/api/v1/rehearsals/recording/{source}/{branch}",
        rehearsals::drop_recording,
    )
}

fn router(state: AppState) -> Router {
    routes()
        .router
        .layer(axum::middleware::from_fn(errors::json_errors))
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
    rehearsals: Arc<rehearsal_run::Runner>,
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
        rehearsals: Arc::new(rehearsal_run::Runner::new(cfg)),
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
        reach: console.reach.clone(),
        rehearsals: bound.rehearsals.clone(),
    };
    tokio::spawn(rehearsal_run::recover(state.clone()));
    // The guard (Host, cross-site, JSON writes) runs first; then the console's gate
    // checks the token (bearer header, or the console's session cookie).
    let gate = console.gate.clone();
    let app = router(state)
        .merge(crate::console::router(console))
        .fallback(errors::no_route)
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
