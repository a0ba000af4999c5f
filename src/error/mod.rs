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

mod api;
mod engine;

pub use api::{status_code_word, ApiError, ErrorBody, ErrorDetail};
pub use engine::EngineError;

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
    #[error("role \"{role}\" may not create branch {branch} ({key})")]
    CreateForbidden {
        role: String,
        branch: BranchId,
        /// The key that says so: `sources.X.create_roles` or a policy's.
        key: String,
    },
    #[error("role \"{role}\" already has {limit} branches of source {source_name} (sources.{source_name}.max_branches_per_role); delete one or raise the limit")]
    RoleQuota {
        role: String,
        source_name: String,
        limit: usize,
    },
    #[error("policy \"{policy}\" of source {source_name} already governs {limit} branches (its max_branches); delete one or raise the limit")]
    PolicyQuota {
        source_name: String,
        policy: String,
        limit: usize,
    },
    #[error("the branches of source {source_name} hold {total}, at or past its max_total_size of {limit}; delete branches or raise the limit")]
    SizeQuota {
        source_name: String,
        limit: String,
        total: String,
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
    /// The session's branch was made again (a forced reset) under it; named as
    /// the client connected to it (`shop.qa`).
    #[error("terminating connection because branch {}.{} was reset", .0.source, .0.branch)]
    BranchReset(BranchId),
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

/// Label values of `offshoot_errors_total`, and the key of [`mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Protocol,
    Routing,
    Quota,
    ProvisionTimeout,
    /// The branch is being created, started, suspended or deleted.
    Busy,
    Backend,
    TooManyConnections,
    TlsRequired,
    ShuttingDown,
    AuthFailed,
    Forbidden,
    /// A snapshot, source database or branch that does not exist.
    NotFound,
    /// Something in the way: a snapshot in use, open connections, a clone that is
    /// not the proxy's.
    Conflict,
    /// The database server refused a statement (its own SQLSTATE is sent).
    ServerError,
    /// The database server could not be reached.
    Unreachable,
    /// The proxy's storage failed.
    Storage,
    /// No space left, on the server or on the proxy's storage.
    DiskFull,
    /// A branch's server did not start.
    ServerStart,
    /// The source's engine does not do that.
    Unsupported,
    /// Any other failure to make a branch.
    ProvisionFailed,
    /// A session ended because its branch was reset.
    Reset,
}

/// What one kind of failure is to a client and to the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The SQLSTATE a client sees (a refused statement sends the server's own).
    pub sqlstate: &'static str,
    /// The HTTP status the admin API answers with.
    pub status: u16,
}

/// The one table from a kind of failure to the SQLSTATE a client sees and the HTTP
/// status the API answers; [`ErrorKind::as_str`] is its metric label.
pub const fn mapping(kind: ErrorKind) -> Mapping {
    let (sqlstate, status) = match kind {
        ErrorKind::Protocol => ("08P01", 400),
        ErrorKind::Routing => ("3D000", 404),
        ErrorKind::Quota => ("53400", 409),
        ErrorKind::ProvisionTimeout => ("57P03", 202),
        ErrorKind::Busy => ("57P03", 409),
        ErrorKind::Backend => ("08006", 502),
        ErrorKind::TooManyConnections => ("53300", 503),
        ErrorKind::TlsRequired => ("28000", 400),
        ErrorKind::ShuttingDown => ("57P01", 503),
        ErrorKind::AuthFailed => ("28P01", 401),
        ErrorKind::Forbidden => ("42501", 403),
        ErrorKind::NotFound => ("3D000", 404),
        ErrorKind::Conflict => ("55000", 409),
        ErrorKind::ServerError => ("XX000", 502),
        ErrorKind::Unreachable => ("08006", 502),
        ErrorKind::Storage => ("58030", 500),
        ErrorKind::DiskFull => ("53100", 507),
        ErrorKind::ServerStart => ("58000", 502),
        ErrorKind::Unsupported => ("0A000", 409),
        ErrorKind::ProvisionFailed => ("58000", 500),
        ErrorKind::Reset => ("57P01", 409),
    };
    Mapping { sqlstate, status }
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Routing => "routing",
            ErrorKind::Quota => "quota",
            ErrorKind::ProvisionTimeout => "provision_timeout",
            ErrorKind::Busy => "busy",
            ErrorKind::Backend => "backend",
            ErrorKind::TooManyConnections => "too_many_connections",
            ErrorKind::TlsRequired => "tls_required",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::AuthFailed => "auth_failed",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Storage => "storage",
            ErrorKind::DiskFull => "disk_full",
            ErrorKind::ServerStart => "server_start",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ProvisionFailed => "provision_failed",
            ErrorKind::Reset => "reset",
        }
    }
}

impl ProvisionError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProvisionError::Quota { .. }
            | ProvisionError::RoleQuota { .. }
            | ProvisionError::PolicyQuota { .. }
            | ProvisionError::SizeQuota { .. } => ErrorKind::Quota,
            ProvisionError::CreateForbidden { .. } => ErrorKind::Forbidden,
            ProvisionError::Timeout(_) => ErrorKind::ProvisionTimeout,
            ProvisionError::Deleting(_) => ErrorKind::Busy,
            ProvisionError::Engine { err, .. } | ProvisionError::Start { err, .. } => err.kind(),
            ProvisionError::Conflict(_) => ErrorKind::Conflict,
            ProvisionError::ShuttingDown => ErrorKind::ShuttingDown,
        }
    }

    /// The SQLSTATE a client sees.
    pub fn sqlstate(&self) -> &str {
        match self {
            ProvisionError::Engine { err, .. } | ProvisionError::Start { err, .. } => {
                err.sqlstate()
            }
            _ => mapping(self.kind()).sqlstate,
        }
    }

    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        mapping(self.kind()).status
    }

    /// What a client may be told (the log gets `Display`).
    pub fn client_message(&self) -> String {
        match self {
            ProvisionError::Engine { id, err } => {
                format!("could not create branch {id}: {}", err.client_message())
            }
            ProvisionError::Start { id, err } => {
                format!(
                    "could not start the server of branch {id}: {}",
                    err.client_message()
                )
            }
            other => other.to_string(),
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
            ClientError::Provision(p) => p.kind(),
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
            ClientError::BranchReset(_) => ErrorKind::Reset,
        }
    }

    /// SQLSTATE sent to the client.
    pub fn sqlstate(&self) -> &str {
        match self {
            ClientError::Protocol(_) => "08P01",
            ClientError::UnsupportedProtocol { .. } => "0A000",
            ClientError::Route(RouteError::NoUser) => "28000",
            ClientError::Route(_) => "3D000",
            ClientError::Provision(p) => p.sqlstate(),
            ClientError::Backend { .. } => "08006",
            ClientError::TooManyConnections | ClientError::TooManyUnauthenticated => "53300",
            ClientError::TlsRequired => "28000",
            ClientError::Replication(_) => "0A000",
            ClientError::AuthFailed(_) => "28P01",
            ClientError::NoLogin(_) | ClientError::CleartextNeedsTls => "28000",
            ClientError::AuthUnavailable => "08006",
            ClientError::Forbidden(_) => "42501",
            ClientError::BranchReset(_) => "57P01",
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

    /// What the client is told; the log gets `Display`, which may hold more.
    pub fn client_message(&self) -> String {
        match self {
            ClientError::Provision(p) => p.client_message(),
            other => other.to_string(),
        }
    }

    /// The ErrorResponse message, encoded and ready to write.
    pub fn response(&self) -> BytesMut {
        encode_error(
            "FATAL",
            self.sqlstate(),
            &self.client_message(),
            self.hint(),
        )
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
            err: EngineError::Sql {
                code: "55006".into(),
                message: "source database \"shop\" is being accessed by other users".into(),
            },
        });
        assert_eq!(busy.sqlstate(), "55006");
        assert_eq!(busy.kind(), ErrorKind::ServerError);
        assert!(busy.client_message().contains("being accessed"));
        let bad = ClientError::from(RouteError::BadName(NameError::Branch("X".into())));
        assert_eq!(bad.sqlstate(), "3D000");
    }

    fn io(errno: nix::errno::Errno) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno as i32)
    }

    #[test]
    fn engine_errors_map_by_kind() {
        let missing = ProvisionError::Engine {
            id: id(),
            err: EngineError::NotFound(
                "snapshot 20000101T000000Z of source shop does not exist".into(),
            ),
        };
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        assert_eq!(missing.sqlstate(), "3D000");
        assert_eq!(missing.status(), 404);

        let full = EngineError::io("could not copy snapshot x", io(nix::errno::Errno::ENOSPC));
        assert_eq!(full.kind(), ErrorKind::DiskFull);
        assert_eq!(full.sqlstate(), "53100");
        assert_eq!(mapping(full.kind()).status, 507);
        let server_full = EngineError::Sql {
            code: "53100".into(),
            message: "could not extend file".into(),
        };
        assert_eq!(server_full.kind(), ErrorKind::DiskFull);
        assert_eq!(server_full.sqlstate(), "53100");

        let denied = EngineError::io("could not copy snapshot x", io(nix::errno::Errno::EACCES));
        assert_eq!(denied.kind(), ErrorKind::Storage);
        assert_eq!(denied.sqlstate(), "58030");

        let start = ProvisionError::Start {
            id: id(),
            err: EngineError::StartFailed {
                fatal: "FATAL: unrecognized configuration parameter \"x\"".into(),
            },
        };
        assert_eq!(start.kind(), ErrorKind::ServerStart);
        assert_eq!(start.status(), 502);
        assert_eq!(start.kind().as_str(), "server_start");
    }

    #[test]
    fn clients_never_see_paths_or_os_errors() {
        let secret = "/var/lib/offshoot/instances/shop/branches/x";
        let errors = [
            EngineError::io(
                "could not copy snapshot x",
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, secret),
            ),
            EngineError::io(
                "could not copy snapshot x",
                std::io::Error::new(std::io::ErrorKind::StorageFull, secret),
            ),
            EngineError::conflict("a directory in the way", Some(secret.into())),
            EngineError::failed_with("pg_basebackup failed", secret),
            EngineError::Unreachable {
                detail: format!("connection refused: {secret}"),
            },
        ];
        for e in errors {
            assert!(
                e.to_string().contains(secret),
                "the log keeps the detail: {e}"
            );
            let client = ClientError::from(ProvisionError::Engine { id: id(), err: e });
            assert!(
                !client.client_message().contains(secret),
                "{}",
                client.client_message()
            );
            let bytes = client.response();
            assert!(!String::from_utf8_lossy(&bytes).contains(secret));
        }
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
