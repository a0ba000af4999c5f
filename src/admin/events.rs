//! `GET /api/v1/events`: the audit trail read back, newest first; who an API call
//! is for the trail ([`ApiActor`]); and the layer that holds every write's answer
//! until its audit lines are on disk.

use std::net::SocketAddr;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tracing::warn;

use super::{ApiError, AppState};
use crate::audit::{Actor, Filter};
use crate::console::session::Access;

/// The caller of an API request as the audit trail names it: its address and the
/// credential it proved (`admin`: the bearer token; `console`: a console session).
pub(super) struct ApiActor(pub Actor);

impl<S: Send + Sync> FromRequestParts<S> for ApiActor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.to_string());
        let token_name = match parts.extensions.get::<Access>() {
            Some(Access::Write) => {
                let bearer = parts
                    .headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer "));
                Some(if bearer { "admin" } else { "console" }.to_owned())
            }
            _ => None,
        };
        Ok(Self(Actor::api(addr, token_name)))
    }
}

/// Answers a write only once the audit lines it caused are fsynced.
pub(super) async fn sync_writes(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let response = next.run(req).await;
    if write {
        s.registry.audit().sync().await;
    }
    response
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Only events of this source.
    source: Option<String>,
    /// Only events of this branch.
    branch: Option<String>,
    /// An action (`branch.expired`), or a prefix pattern (`branch.*`).
    action: Option<String>,
    /// RFC 3339, or a duration back from now (`10m`).
    since: Option<String>,
    /// At most this many events.
    limit: Option<String>,
}

/// The audit trail, newest first, filtered.
#[utoipa::path(get, path = "/api/v1/events", operation_id = "list_events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "The events, newest first", body = Vec<crate::audit::Event>),
        (status = 400, description = "A bad filter, named", body = crate::error::ErrorBody),
        (status = 500, description = "The audit trail cannot be read", body = crate::error::ErrorBody),
    ))]
pub(super) async fn list(
    State(s): State<AppState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(super::errors::bad_query)?;
    let filter = Filter::parse(
        q.source,
        q.branch,
        q.action,
        q.since.as_deref(),
        q.limit.as_deref(),
        s.registry.clock().now(),
    )
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let events = s.registry.audit().query(filter).await.map_err(|e| {
        warn!(error = %e, "cannot read the audit trail");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the audit trail; the proxy's log has the detail",
        )
    })?;
    Ok(Json(events))
}
