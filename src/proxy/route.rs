//! (database, user) → (source, branch), and the parameters the branch's server sees.
//!
//! Routing fails closed: a name that does not resolve to a branch is an error, never
//! the source database itself and never another database.

use super::protocol::Startup;
use crate::branch::Registry;
use crate::config::{ProxyConfig, RouteBy};
use crate::error::RouteError;
use crate::names::{BranchId, BranchName, SourceName};

/// Where a client goes and who it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub id: BranchId,
    /// The user name the server sees (the branch suffix removed in user routing).
    pub user: String,
}

fn split_last<'a>(name: &'a str, sep: &str) -> (&'a str, Option<&'a str>) {
    match name.rfind(sep) {
        Some(i) => (&name[..i], Some(&name[i + sep.len()..])),
        None => (name, None),
    }
}

/// `(source, branch)` named by a TLS server name under `suffix`:
/// `pr-42.shop.db.example.com` under `db.example.com` is branch `pr-42` of `shop`.
pub fn from_server_name<'a>(name: &'a str, suffix: &str) -> Option<(&'a str, &'a str)> {
    let cut = name.len().checked_sub(suffix.len() + 1)?;
    let (head, tail) = name.split_at(cut);
    if !tail.starts_with('.') || !tail[1..].eq_ignore_ascii_case(suffix) {
        return None;
    }
    let (branch, source) = head.split_once('.')?;
    Some((source, branch))
}

/// The names a startup packet gives, before any is checked against the
/// configuration: the source, the branch (if named), and the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names<'a> {
    pub source: &'a str,
    pub branch: Option<&'a str>,
    /// The role the client is and the server sees (the branch suffix removed in
    /// user routing).
    pub role: &'a str,
}

/// Reads the names out of a startup packet. `sni` is the `(source, branch)` a TLS
/// server name named, which takes precedence over the database name.
pub fn names<'a>(
    startup: &'a Startup,
    cfg: &ProxyConfig,
    sni: Option<(&'a str, &'a str)>,
) -> Result<Names<'a>, RouteError> {
    let user = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or(RouteError::NoUser)?;
    // PostgreSQL's default: the database is named like the user.
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    let sep = cfg.separator.as_str();
    let (source, branch, role) = match (sni, cfg.route_by) {
        (Some((source, branch)), _) => (source, Some(branch), user),
        (None, RouteBy::Database) => {
            let (s, b) = split_last(database, sep);
            (s, b, user)
        }
        (None, RouteBy::User) => {
            let (u, b) = split_last(user, sep);
            (database, b, u)
        }
    };
    Ok(Names {
        source,
        branch,
        role,
    })
}

/// Resolves a startup packet to a branch. `sni` is the `(source, branch)` a TLS
/// server name named, which takes precedence over the database name.
pub fn route(
    startup: &Startup,
    cfg: &ProxyConfig,
    registry: &Registry,
    sni: Option<(&str, &str)>,
) -> Result<Route, RouteError> {
    let Names {
        source: source_name,
        branch,
        role: server_user,
    } = names(startup, cfg, sni)?;
    let sep = cfg.separator.as_str();
    let source = registry
        .source(source_name)
        .ok_or_else(|| RouteError::UnknownSource {
            name: source_name.to_owned(),
            known: registry.source_names().join(", "),
        })?;
    let branch = match branch {
        Some(b) => BranchName::new(b)?,
        None => match &source.config.default_branch {
            Some(b) => b.clone(),
            None => {
                return Err(RouteError::NoBranch {
                    name: match cfg.route_by {
                        RouteBy::Database => source_name.to_owned(),
                        RouteBy::User => server_user.to_owned(),
                    },
                    sep: sep.to_owned(),
                })
            }
        },
    };
    Ok(Route {
        id: BranchId {
            source: SourceName::new(source_name)?,
            branch,
        },
        user: server_user.to_owned(),
    })
}

/// The startup parameters sent to the branch's server: the client's own, with user
/// and database replaced and protocol options (`_pq_.*`) removed.
pub fn server_params(startup: &Startup, user: &str, database: &str) -> Vec<(String, String)> {
    let mut out = vec![
        ("user".to_owned(), user.to_owned()),
        ("database".to_owned(), database.to_owned()),
    ];
    out.extend(
        startup
            .params
            .iter()
            .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_."))
            .cloned(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_last_separator() {
        assert_eq!(split_last("shop.pr-1", "."), ("shop", Some("pr-1")));
        assert_eq!(split_last("a.b.c", "."), ("a.b", Some("c")));
        assert_eq!(split_last("shop", "."), ("shop", None));
        assert_eq!(split_last("shop.", "."), ("shop", Some("")));
    }

    #[test]
    fn server_names_route_under_the_suffix() {
        let s = "db.example.com";
        assert_eq!(
            from_server_name("pr-42.shop.db.example.com", s),
            Some(("shop", "pr-42"))
        );
        assert_eq!(
            from_server_name("pr-42.shop.DB.Example.com", s),
            Some(("shop", "pr-42"))
        );
        assert_eq!(from_server_name("shop.db.example.com", s), None);
        assert_eq!(from_server_name("pr-42.shop.xdb.example.com", s), None);
        assert_eq!(from_server_name("db.example.com", s), None);
        assert_eq!(from_server_name("x", s), None);
    }

    #[test]
    fn server_params_replace_routing_keys() {
        let s = Startup {
            major: 3,
            minor: 0,
            params: vec![
                ("user".into(), "app.pr-1".into()),
                ("database".into(), "shop".into()),
                ("options".into(), "-c search_path=x".into()),
                ("_pq_.thing".into(), "1".into()),
            ],
        };
        let p = server_params(&s, "app", "shop__pr-1");
        assert_eq!(
            p,
            vec![
                ("user".to_owned(), "app".to_owned()),
                ("database".to_owned(), "shop__pr-1".to_owned()),
                ("options".to_owned(), "-c search_path=x".to_owned()),
            ]
        );
    }
}
