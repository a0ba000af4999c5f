//! The source's policies, applied once the client is authenticated and routed:
//! whether replication sessions are allowed, and which roles may connect to and
//! create branches.

use tracing::warn;

use super::protocol::Startup;
use super::route::Route;
use super::Proxy;
use crate::branch::registry::Creator;
use crate::error::ClientError;

/// Checks `route` against its source's policies. `authenticated`: the proxy
/// checked the client's password (not `trust`); only then do role rules apply, and
/// only then is there a [`Creator`] to count branches against.
pub(super) fn authorize(
    proxy: &Proxy,
    startup: &Startup,
    route: &Route,
    authenticated: bool,
) -> Result<Option<Creator>, ClientError> {
    let source = proxy
        .registry
        .source(route.id.source.as_str())
        .ok_or_else(|| ClientError::Protocol("the source is no longer configured".into()))?;
    let cfg = &source.config;
    // Replication sessions would stream the clone's WAL and bypass its policies.
    if wants_replication(startup) && !cfg.allow_replication {
        return Err(ClientError::Replication(route.id.source.to_string()));
    }
    if !authenticated {
        return Ok(None);
    }
    let listed = |roles: &[String]| roles.is_empty() || roles.contains(&route.user);
    let policy = cfg.policy(&route.id.branch);
    if !listed(policy.connect_roles) {
        proxy
            .metrics
            .policy_refusals_total
            .with_label_values(&[route.id.source.as_str(), "connect_roles"])
            .inc();
        let key = match policy.index {
            Some(i) => format!(
                "policy \"{}\", sources.{}.policies[{i}].connect_roles",
                policy.name.unwrap_or_default(),
                route.id.source
            ),
            None => format!("sources.{}.connect_roles", route.id.source),
        };
        return Err(ClientError::Forbidden(format!(
            "role \"{}\" may not connect to branch {} ({key})",
            route.user, route.id
        )));
    }
    Ok(Some(Creator {
        role: route.user.clone(),
        may_create: listed(policy.create_roles),
        max_branches: cfg.max_branches_per_role,
    }))
}

/// Refuses a superuser of the source's server when the source says
/// `allow_superuser = false`: a superuser in a clone can run programs as the branch
/// servers' OS user. Checked under every method, `trust` included.
pub(super) async fn refuse_superuser(proxy: &Proxy, route: &Route) -> Result<(), ClientError> {
    let source = route.id.source.as_str();
    let allowed = proxy
        .registry
        .source(source)
        .is_none_or(|s| s.config.allow_superuser);
    if allowed {
        return Ok(());
    }
    match proxy
        .access
        .credentials
        .is_superuser(source, &route.user)
        .await
    {
        Ok(false) => Ok(()),
        Ok(true) => Err(ClientError::Forbidden(format!(
            "superuser \"{}\" may not log in to branches of source {source} \
             (sources.{source}.allow_superuser = false); use a role without SUPERUSER",
            route.user
        ))),
        Err(e) => {
            warn!(source, error = %e.0, "cannot tell whether the role is a superuser");
            Err(ClientError::AuthUnavailable)
        }
    }
}

/// Whether the startup packet asks for a replication session (`replication` set to
/// anything PostgreSQL reads as true, or `database`).
fn wants_replication(startup: &Startup) -> bool {
    startup.get("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(replication: Option<&str>) -> Startup {
        let mut params = vec![("user".to_owned(), "app".to_owned())];
        if let Some(r) = replication {
            params.push(("replication".to_owned(), r.to_owned()));
        }
        Startup {
            major: 3,
            minor: 0,
            params,
        }
    }

    #[test]
    fn replication_values() {
        assert!(!wants_replication(&startup(None)));
        for off in ["false", "OFF", "no", "0"] {
            assert!(!wants_replication(&startup(Some(off))), "{off}");
        }
        for on in ["true", "on", "yes", "1", "database"] {
            assert!(wants_replication(&startup(Some(on))), "{on}");
        }
    }
}
