//! A branch's TTL and protection on the API: reading them from a creation's body,
//! and `PATCH /api/v1/branches/{source}/{branch}` to change them later.

use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Deserializer};
use tracing::warn;

use super::branch_path::{not_found, BranchPath};
use super::{ApiError, AppState};
use crate::branch::{Changes, CreateOptions, UpdateError};
use crate::clock::unix_ms;
use crate::error::ErrorKind;

/// Tells a key sent as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A point in time the API accepts: RFC 3339 with `Z` or a numeric offset.
pub(super) fn parse_time(key: &str, text: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "\"{key}\": {text:?} is not an RFC 3339 time such as \"2030-01-31T18:00:00Z\" \
                 or \"2030-01-31T19:00:00+01:00\""
            ),
        )
    };
    let t = text.trim();
    // humantime reads UTC only; a numeric offset is taken off by hand.
    let (local, offset_secs) = match t.len().checked_sub(6).map(|i| t.split_at(i)) {
        Some((local, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().map_err(|_| bad())?;
            let m: i64 = off[4..6].parse().map_err(|_| bad())?;
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{local}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (t.to_owned(), 0),
    };
    let utc = humantime::parse_rfc3339(&local).map_err(|_| bad())?;
    let ms = i64::try_from(unix_ms(utc)).map_err(|_| bad())? - offset_secs * 1000;
    u64::try_from(ms).map_err(|_| bad())
}

/// `ttl` ("3d") or `expires_at` (RFC 3339), at most one, as Unix milliseconds.
pub(super) fn deadline(
    now: SystemTime,
    ttl: Option<&str>,
    expires_at: Option<&str>,
) -> Result<Option<u64>, ApiError> {
    match (ttl, expires_at) {
        (Some(_), Some(_)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "give either \"ttl\" or \"expires_at\", not both",
        )),
        (Some(ttl), None) => {
            let d = humantime::parse_duration(ttl.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("\"ttl\": {ttl:?} is not a duration such as \"3d\" or \"12h\""),
                    )
                })?;
            Ok(Some(unix_ms(now + d)))
        }
        (None, Some(at)) => {
            let at = parse_time("expires_at", at)?;
            if at <= unix_ms(now) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "\"expires_at\" is in the past",
                ));
            }
            Ok(Some(at))
        }
        (None, None) => Ok(None),
    }
}

/// The lifecycle keys of a creation's body.
#[derive(Debug, Default)]
pub(super) struct CreateLifecycle {
    /// Removed this long after creation ("3d"), whatever its policy says.
    pub ttl: Option<String>,
    /// Or removed at this time (RFC 3339).
    pub expires_at: Option<String>,
    /// Overrides its policy's `protected`.
    pub protected: Option<bool>,
    /// Protected until this time (RFC 3339); implies `protected`.
    pub protected_until: Option<String>,
}

impl CreateLifecycle {
    /// Fills the lifecycle fields of `opts`; `persistent`: the branch would never
    /// expire (so a TTL is refused).
    pub(super) fn apply(
        &self,
        now: SystemTime,
        persistent: bool,
        opts: &mut CreateOptions,
    ) -> Result<(), ApiError> {
        opts.expires_at = deadline(now, self.ttl.as_deref(), self.expires_at.as_deref())?;
        if opts.expires_at.is_some() && persistent {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "a persistent branch never expires, so it takes no \"ttl\" or \"expires_at\"",
            ));
        }
        opts.protected_until = self
            .protected_until
            .as_deref()
            .map(|t| parse_time("protected_until", t))
            .transpose()?;
        opts.protected = match (self.protected, opts.protected_until) {
            (Some(false), Some(_)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "\"protected_until\" needs \"protected\" true (or left out)",
                ))
            }
            (None, Some(_)) => Some(true),
            (p, _) => p,
        };
        Ok(())
    }
}

/// `PATCH /api/v1/branches/{source}/{branch}`: keys left out stay as they are.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    /// Removed this long from now; `null` removes the TTL (the policy applies).
    #[serde(default, deserialize_with = "present")]
    ttl: Option<Option<String>>,
    /// Removed at this time; `null` removes the TTL.
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    protected: Option<bool>,
    /// When the protection ends; `null`: never by itself. Alone, it protects.
    #[serde(default, deserialize_with = "present")]
    protected_until: Option<Option<String>>,
}

/// Changes a branch's TTL or protection; keys left out stay as they are.
#[utoipa::path(patch, path = "/api/v1/branches/{source}/{branch}", operation_id = "update_branch",
    tag = "branches", request_body = PatchBody,
    params(BranchPath),
    responses(
        (status = 200, description = "The branch as changed", body = crate::branch::BranchView),
        (status = 400, description = "A bad time, duration or combination", body = crate::error::ErrorBody),
        (status = 404, description = "No such source or branch", body = crate::error::ErrorBody),
        (status = 409, description = "Being created or deleted, or a TTL on a persistent branch", body = crate::error::ErrorBody),
        (status = 422, description = "A JSON body with unknown fields", body = crate::error::ErrorBody),
    ))]
pub(super) async fn patch(
    State(s): State<AppState>,
    super::events::ApiActor(actor): super::events::ApiActor,
    Path(path): Path<BranchPath>,
    body: Result<Json<PatchBody>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(super::errors::bad_body)?;
    let id = path.resolve(&s)?;
    let now = s.registry.clock().now();
    let expires_at = match (body.ttl, body.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "give either \"ttl\" or \"expires_at\", not both",
            ))
        }
        (Some(None), None) | (None, Some(None)) => Some(None),
        (Some(Some(ttl)), None) => Some(deadline(now, Some(&ttl), None)?),
        (None, Some(Some(at))) => Some(deadline(now, None, Some(&at))?),
        (None, None) => None,
    };
    let protected_until = match body.protected_until {
        Some(Some(t)) => Some(Some(parse_time("protected_until", &t)?)),
        other => other.map(|_| None),
    };
    if body.protected == Some(false) && protected_until.flatten().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "\"protected_until\" needs \"protected\" true (or left out)",
        ));
    }
    let changes = Changes {
        expires_at,
        protected: body.protected,
        protected_until,
    };
    let view = s
        .registry
        .update(&id, &changes, actor)
        .map_err(update_error)?;
    Ok(Json(view))
}

fn update_error(e: UpdateError) -> ApiError {
    match e {
        UpdateError::NotFound(id) => not_found(&id),
        e @ UpdateError::Busy(_) => ApiError::of_kind(ErrorKind::Busy, e.to_string()),
        e @ UpdateError::Persistent { .. } => ApiError::of_kind(ErrorKind::Conflict, e.to_string()),
        UpdateError::Store(id, err) => {
            warn!(branch = %id, error = %err, "could not save the branch record");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("could not save branch {id}'s record; see the proxy's log"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_take_utc_and_offsets() {
        let z = parse_time("t", "2030-01-31T18:00:00Z").ok();
        assert_eq!(z, Some(1_896_112_800_000));
        assert_eq!(parse_time("t", "2030-01-31T19:00:00+01:00").ok(), z);
        assert_eq!(parse_time("t", "2030-01-31T12:30:00-05:30").ok(), z);
        for bad in ["tomorrow", "2030-01-31", "2030-01-31T18:00:00+25:00", ""] {
            let Err(e) = parse_time("expires_at", bad) else {
                panic!("{bad} is refused")
            };
            assert!(e.message.contains("\"expires_at\""), "{}", e.message);
        }
    }

    #[test]
    fn a_deadline_is_a_ttl_or_a_time_in_the_future() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            deadline(now, Some("3d"), None).ok(),
            Some(Some(unix_ms(now) + 3 * 86_400_000))
        );
        assert_eq!(deadline(now, None, None).ok(), Some(None));
        assert!(deadline(now, Some("soon"), None).is_err());
        assert!(deadline(now, Some("0s"), None).is_err());
        assert!(deadline(now, None, Some("1970-01-01T00:00:01Z")).is_err());
        assert!(deadline(now, Some("1d"), Some("2030-01-31T18:00:00Z")).is_err());
    }
}
