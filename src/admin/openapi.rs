//! The OpenAPI 3.1 document of the admin API, generated from the handlers' own
//! annotations and types (`utoipa`), and served at `/api/v1/openapi.json`.
//!
//! Served without the token, like `/healthz`: it is compiled into the binary and
//! is the same for every deployment (no source, branch, path or setting of this
//! one), and tools that generate clients or validate it fetch it before they have
//! a token.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Offshoot admin API",
        description = "Branches, snapshots and sources of an Offshoot proxy. Every error \
            answer has one shape: `{\"error\": {\"code\", \"message\", \"sqlstate\"?}}`. \
            Send the admin token as `Authorization: Bearer <token>`."
    ),
    paths(
        super::metrics,
        super::healthz,
        super::openapi_json,
        super::sources,
        super::list,
        super::create,
        super::show,
        super::delete,
        super::lifecycle::patch,
        super::suspend,
        super::reset::reset,
        super::list_snapshots,
        super::take_snapshot,
        super::delete_snapshot,
        super::orphans,
        super::events::list,
        super::rehearsals::list,
        super::rehearsals::store,
        super::rehearsal_run::start,
        super::rehearsals::show,
        super::rehearsals::recording,
        super::rehearsals::drop_recording,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "branches", description = "Branches: clones of a source, one per test cycle"),
        (name = "snapshots", description = "Sealed copies of a source that branches start from"),
        (name = "sources", description = "The configured sources"),
        (name = "events", description = "The audit trail"),
        (name = "rehearsals", description = "Migration rehearsals' reports, and what they read from the proxy"),
        (name = "operations", description = "Health, metrics, orphans and this document"),
    )
)]
pub struct ApiDoc;

/// The admin token, sent as a bearer header (the console uses a session cookie
/// instead, obtained with the same token).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (`admin.token_file`, default `<state.dir>/admin.token`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

    #[test]
    fn every_served_route_is_documented_and_nothing_else() {
        let doc = serde_json::to_value(document()).unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let served: BTreeSet<(String, String)> = super::super::routes()
            .list
            .iter()
            .map(|(m, p)| (m.as_str().to_ascii_lowercase(), p.to_string()))
            .collect();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .expect("operations")
                    .keys()
                    .filter(|k| METHODS.contains(&k.as_str()))
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "served but not in the OpenAPI document (annotate the handler with \
             #[utoipa::path] and name it in ApiDoc): {undocumented:?}"
        );
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            unserved.is_empty(),
            "documented but not served: {unserved:?}"
        );
    }

    #[test]
    fn operation_ids_are_unique() {
        let doc = serde_json::to_value(document()).unwrap();
        let mut seen = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_default().to_owned();
                assert!(
                    seen.insert(id.clone()),
                    "{method} {path}: operationId {id:?} is taken"
                );
            }
        }
    }

    #[test]
    fn errors_and_bearer_auth_are_described() {
        let doc = serde_json::to_value(document()).unwrap();
        let schemes = &doc["components"]["securitySchemes"]["bearer"];
        assert_eq!(schemes["type"], "http");
        assert_eq!(schemes["scheme"], "bearer");
        let error = &doc["components"]["schemas"]["ErrorBody"];
        assert!(error["properties"]["error"].is_object(), "{error}");
        // Every write documents an error answer in the one shape.
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                if method == "get" {
                    continue;
                }
                let refs = op["responses"].to_string();
                assert!(
                    refs.contains("#/components/schemas/ErrorBody"),
                    "{method} {path}"
                );
            }
        }
    }
}
