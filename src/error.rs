//! Error kinds and the single mapping to what a client sees.
//!
//! Every failure a client can be told about ends up as a [`ClientError`]. Its
//! [`ClientError::kind`] is also the label of `offshoot_errors_total`, and
//! [`ClientError::response`] is the one place that chooses the SQLSTATE and the
//! words. Internal details (paths, OS errors of the proxy's own machinery) are
//! logged where the error is handled, not sent.

use bytes::BytesMut;
use pgwire::error::ErrorInfo;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

use crate::names::{BranchId, NameError};

/// A failure reported by a clone engine, with the server's SQLSTATE when it had one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// SQLSTATE from the database server, if the failure came from one.
    pub code: Option<String>,
    pub message: String,
}

impl EngineError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            code: None,
            message: message.into(),
        }
    }
}

impl From<tokio_postgres::Error> for EngineError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Self {
                code: Some(db.code().code().to_owned()),
                message: db.message().to_owned(),
            },
            None => {
                // The cause (refused, TLS certificate, timeout) is in the source chain.
                let mut message = format!("database server unreachable: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    message.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                Self::new(message)
            }
        }
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string())
    }
}

/// Why a branch could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProvisionError {
    #[error("source {source_name} already has {limit} branches (max_branches); delete one or raise the limit")]
    Quota { source_name: String, limit: usize },
    #[error("branch {0} is still being created; try again shortly")]
    Timeout(BranchId),
    #[error("could not create branch {id}: {err}")]
    Engine { id: BranchId, err: EngineError },
    #[error("could not start the server of branch {id}: {err}")]
    Start { id: BranchId, err: EngineError },
    #[error("{0}")]
    Conflict(String),
    #[error("branch {0} is being deleted")]
    Deleting(BranchId),
    #[error("role \"{role}\" may not create branches of source {source_name} (sources.{source_name}.create_roles)")]
    CreateForbidden { role: String, source_name: String },
    #[error("role \"{role}\" already has {limit} branches of source {source_name} (sources.{source_name}.max_branches_per_role); delete one or raise the limit")]
    RoleQuota {
        role: String,
        source_name: String,
        limit: usize,
    },
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// Everything the proxy itself may tell a client before the relay starts.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Protocol(String),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("{0}")]
    Provision(#[from] ProvisionError),
    #[error("could not connect to the server of branch {id}: {reason}")]
    Backend { id: BranchId, reason: String },
    #[error("sorry, too many clients already")]
    TooManyConnections,
    #[error(
        "too many connections from this address have not finished authenticating \
         (proxy.max_unauthenticated_per_address)"
    )]
    TooManyUnauthenticated,
    #[error("this proxy requires TLS: connect with sslmode=require (or verify-full)")]
    TlsRequired,
    #[error("replication connections to source {0} are not allowed through the proxy (sources.{0}.allow_replication)")]
    Replication(String),
    /// Wrong password, unknown role, no password, expired password: one message, so
    /// roles cannot be enumerated.
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    #[error("role \"{0}\" is not permitted to log in")]
    NoLogin(String),
    #[error("password authentication needs TLS here: connect with sslmode=require (or use SCRAM)")]
    CleartextNeedsTls,
    /// The credentials could not be looked up; the detail goes to the log only.
    #[error("cannot check credentials right now; try again shortly")]
    AuthUnavailable,
    #[error("{0}")]
    Forbidden(String),
}

/// Why a startup packet does not name a reachable branch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("database {name:?} names no branch: connect to \"{name}{sep}<branch>\"")]
    NoBranch { name: String, sep: String },
    #[error("source {name:?} does not exist; configured sources: {known}")]
    UnknownSource { name: String, known: String },
    #[error("{0}")]
    BadName(#[from] NameError),
}

/// Label values of `offshoot_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Protocol,
    Routing,
    Quota,
    ProvisionTimeout,
    ProvisionFailed,
    Backend,
    TooManyConnections,
    TlsRequired,
    ShuttingDown,
    AuthFailed,
    Forbidden,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Routing => "routing",
            ErrorKind::Quota => "quota",
            ErrorKind::ProvisionTimeout => "provision_timeout",
            ErrorKind::ProvisionFailed => "provision_failed",
            ErrorKind::Backend => "backend",
            ErrorKind::TooManyConnections => "too_many_connections",
            ErrorKind::TlsRequired => "tls_required",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::AuthFailed => "auth_failed",
            ErrorKind::Forbidden => "forbidden",
        }
    }
}

impl ClientError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Protocol(_) | ClientError::UnsupportedProtocol { .. } => {
                ErrorKind::Protocol
            }
            ClientError::Route(_) => ErrorKind::Routing,
            ClientError::Provision(p) => match p {
                ProvisionError::Quota { .. } | ProvisionError::RoleQuota { .. } => ErrorKind::Quota,
                ProvisionError::CreateForbidden { .. } => ErrorKind::Forbidden,
                ProvisionError::Timeout(_) => ErrorKind::ProvisionTimeout,
                ProvisionError::Engine { .. }
                | ProvisionError::Start { .. }
                | ProvisionError::Conflict(_)
                | ProvisionError::Deleting(_) => ErrorKind::ProvisionFailed,
                ProvisionError::ShuttingDown => ErrorKind::ShuttingDown,
            },
            ClientError::Backend { .. } => ErrorKind::Backend,
            ClientError::TooManyConnections | ClientError::TooManyUnauthenticated => {
                ErrorKind::TooManyConnections
            }
            ClientError::TlsRequired => ErrorKind::TlsRequired,
            ClientError::Replication(_) => ErrorKind::Routing,
            ClientError::AuthFailed(_)
            | ClientError::NoLogin(_)
            | ClientError::CleartextNeedsTls
            | ClientError::AuthUnavailable => ErrorKind::AuthFailed,
            ClientError::Forbidden(_) => ErrorKind::Forbidden,
        }
    }

    /// SQLSTATE sent to the client.
    pub fn sqlstate(&self) -> &str {
        match self {
            ClientError::Protocol(_) => "08P01",
            ClientError::UnsupportedProtocol { .. } => "0A000",
            ClientError::Route(RouteError::NoUser) => "28000",
            ClientError::Route(_) => "3D000",
            ClientError::Provision(p) => match p {
                ProvisionError::Quota { .. } | ProvisionError::RoleQuota { .. } => "53400",
                ProvisionError::CreateForbidden { .. } => "42501",
                ProvisionError::Timeout(_) | ProvisionError::Deleting(_) => "57P03",
                // The server's own code says what went wrong (55006 template busy,
                // 53100 disk full, 42501 permission); otherwise a system error.
                ProvisionError::Engine { err, .. } | ProvisionError::Start { err, .. } => {
                    err.code.as_deref().unwrap_or("58000")
                }
                ProvisionError::Conflict(_) => "55000",
                ProvisionError::ShuttingDown => "57P01",
            },
            ClientError::Backend { .. } => "08006",
            ClientError::TooManyConnections | ClientError::TooManyUnauthenticated => "53300",
            ClientError::TlsRequired => "28000",
            ClientError::Replication(_) => "0A000",
            ClientError::AuthFailed(_) => "28P01",
            ClientError::NoLogin(_) | ClientError::CleartextNeedsTls => "28000",
            ClientError::AuthUnavailable => "08006",
            ClientError::Forbidden(_) => "42501",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            ClientError::Route(RouteError::BadName(NameError::Branch(_))) => {
                Some("for example: shop.pr-42".into())
            }
            ClientError::Provision(ProvisionError::Timeout(_)) => {
                Some("creation goes on in the background; reconnect in a moment".into())
            }
            _ => None,
        }
    }

    /// The ErrorResponse message, encoded and ready to write.
    pub fn response(&self) -> BytesMut {
        encode_error("FATAL", self.sqlstate(), &self.to_string(), self.hint())
    }
}

/// Encodes an ErrorResponse (severity FATAL or ERROR) the way PostgreSQL lays it out.
pub fn encode_error(severity: &str, code: &str, message: &str, hint: Option<String>) -> BytesMut {
    let mut info = ErrorInfo::new(severity.to_owned(), code.to_owned(), message.to_owned());
    info.hint = hint;
    let mut fields = ErrorResponse::from(info).fields;
    // PostgreSQL also sends the non-localized severity (V) right after S.
    fields.insert(1, (b'V', severity.to_owned()));
    let mut buf = BytesMut::with_capacity(64 + message.len());
    ErrorResponse::new(fields)
        .encode(&mut buf)
        .expect("encoding into a BytesMut cannot fail");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{BranchName, SourceName};

    fn id() -> BranchId {
        BranchId {
            source: SourceName::new("shop").unwrap(),
            branch: BranchName::new("pr-1").unwrap(),
        }
    }

    #[test]
    fn sqlstates_follow_postgres() {
        let quota = ClientError::from(ProvisionError::Quota {
            source_name: "shop".into(),
            limit: 3,
        });
        assert_eq!(quota.sqlstate(), "53400");
        assert_eq!(
            ClientError::from(ProvisionError::Timeout(id())).sqlstate(),
            "57P03"
        );
        let busy = ClientError::from(ProvisionError::Engine {
            id: id(),
            err: EngineError {
                code: Some("55006".into()),
                message: "source database \"shop\" is being accessed by other users".into(),
            },
        });
        assert_eq!(busy.sqlstate(), "55006");
        assert!(busy.to_string().contains("being accessed"));
        let bad = ClientError::from(RouteError::BadName(NameError::Branch("X".into())));
        assert_eq!(bad.sqlstate(), "3D000");
    }

    #[test]
    fn error_response_layout() {
        let buf = encode_error("FATAL", "3D000", "nope", None);
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        assert_eq!(&buf[5..12], b"SFATAL\0");
        assert_eq!(&buf[12..19], b"VFATAL\0");
        assert_eq!(&buf[19..26], b"C3D000\0");
        assert_eq!(*buf.last().unwrap(), 0);
    }
}
