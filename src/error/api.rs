//! The HTTP side of the one mapping: every error the admin listener answers with
//! JSON has one shape, `{"error": {"code": "...", "message": "...", "sqlstate"?:
//! "..."}}`, built here and nowhere else.
//!
//! `code` is a stable word for scripts: the failure's [`ErrorKind`] label when the
//! failure has one (`not_found`, `conflict`, `quota`, ...), otherwise a word for the
//! HTTP status (`bad_request`, `unauthorized`, ...). `sqlstate` is there when the
//! failure is one a PostgreSQL client would see with that SQLSTATE. The message is
//! for a person: never a path of the proxy, an OS error or Rust debug text.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{mapping, ErrorKind};

/// An error answer of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub sqlstate: Option<String>,
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "branch shop.pr-7 does not exist", "sqlstate": "3D000"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable word for scripts: the failure's kind (`not_found`, `conflict`,
    /// `quota`, `busy`, ...) or, for failures of the request itself, the HTTP
    /// status's (`bad_request`, `unauthorized`, `unsupported_media_type`, ...).
    pub code: String,
    /// What happened and, where there is something to do, what to do.
    pub message: String,
    /// The SQLSTATE a PostgreSQL client sees for the same failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
}

/// The code of an error that has no [`ErrorKind`]: its status, as a word.
pub fn status_code_word(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        421 => "misdirected_request",
        422 => "unprocessable_entity",
        429 => "too_many_requests",
        503 => "unavailable",
        s if s >= 500 => "internal",
        _ => "error",
    }
}

impl ApiError {
    /// A failure of the request itself (a bad body, a missing token, ...).
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code: status_code_word(status).to_owned(),
            message: message.into(),
            sqlstate: None,
        }
    }

    /// A failure of `kind`, answered with the status and SQLSTATE the one mapping
    /// gives it.
    pub fn of_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        let m = mapping(kind);
        Self {
            status: StatusCode::from_u16(m.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: kind.as_str().to_owned(),
            message: message.into(),
            sqlstate: Some(m.sqlstate.to_owned()),
        }
    }

    /// Replaces the SQLSTATE (a statement the server refused keeps the server's own).
    pub fn with_sqlstate(mut self, sqlstate: impl Into<String>) -> Self {
        self.sqlstate = Some(sqlstate.into());
        self
    }

    /// Adds what to do about it to the message.
    pub fn hint(mut self, hint: impl std::fmt::Display) -> Self {
        self.message = format!("{}; {hint}", self.message);
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
                sqlstate: self.sqlstate.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_their_status_code_and_sqlstate() {
        let e = ApiError::of_kind(ErrorKind::NotFound, "branch shop.x does not exist");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "not_found",
                "message": "branch shop.x does not exist", "sqlstate": "3D000"}})
        );
    }

    #[test]
    fn request_errors_have_no_sqlstate() {
        let e = ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send JSON").hint("see the docs");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(v["error"]["code"], "unsupported_media_type");
        assert_eq!(v["error"]["message"], "send JSON; see the docs");
        assert!(v["error"].get("sqlstate").is_none(), "{v}");
    }
}
