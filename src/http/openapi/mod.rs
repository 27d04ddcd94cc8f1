//! The HTTP API described in OpenAPI 3.1, built from the handlers' own
//! `#[utoipa::path]` annotations and the views' derived schemas: the router
//! and this document come from one list ([`super::router`]), so a route
//! cannot exist without being described.
//!
//! Answers every route shares are added here once, by rule, as the
//! server gives them: `401`/`403` on routes that need an API token, `403`
//! and `404` on the order routes a tracking token opens, `429
//! rate_limited` outside the exempt routes, `408 body_timeout` on routes
//! with a body, and the problem+json body of every 4xx/5xx.

pub mod order_record;

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi as _};

use super::problem::PROBLEM_JSON;
use crate::domain::RejectReason;

/// The security scheme of API tokens (`Authorization: Bearer <token>`).
pub const BEARER: &str = "bearer";
/// The security scheme of a tracking token passed as `?token=`.
pub const TRACKING_QUERY: &str = "tracking_token";

/// Stands in an answer's description for the codes of a refused order.
pub const ORDER_REASONS: &str = "{order_reasons}";

/// Routes the per-client rate limit never refuses: probes and scrapes must
/// see the instance as it is, not as throttled.
pub const RATE_LIMIT_EXEMPT: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "orderflow",
        description = include_str!("description.md"),
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(super::problem::ProblemBody, order_record::OrderRecord)),
    tags(
        (name = "orders", description = "Place orders and follow them."),
        (name = "inventory", description = "Stock counters per SKU."),
        (name = "admin", description = "Produce raw orders, the park lane."),
        (name = "operations", description = "Health, readiness, metrics, this document."),
    ),
)]
struct ApiDoc;

/// The OpenAPI document of the routes [`super::router`] serves.
pub fn document() -> OpenApi {
    let (_, paths) = super::api_routes().split_for_parts();
    let mut doc = ApiDoc::openapi();
    doc.merge(paths);
    Shared.modify(&mut doc);
    doc
}

static DOCUMENT_JSON: LazyLock<Vec<u8>> = LazyLock::new(|| {
    document()
        .to_pretty_json()
        .expect("the OpenAPI document always serializes")
        .into_bytes()
});

/// This document.
///
/// `GET /openapi.json`: the HTTP API in OpenAPI 3.1, built from the handlers.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json", body = Object)),
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT_JSON.as_slice(),
    )
        .into_response()
}

/// Adds the security schemes and the answers every route shares.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (roles admin, reader, producer), or an order's tracking token on the order routes.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            TRACKING_QUERY,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "An order's tracking token, as `POST /v1/orders` answered it.",
            ))),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                add_shared_answers(path, op);
            }
        }
    }
}

/// The security schemes an operation accepts: one list per alternative.
fn schemes(op: &Operation) -> Vec<Vec<String>> {
    // `SecurityRequirement` has no accessor; its JSON is `{name: scopes}`.
    let json = serde_json::to_value(&op.security).unwrap_or_default();
    let alternatives = json.as_array().map(Vec::as_slice).unwrap_or_default();
    alternatives
        .iter()
        .map(|a| {
            a.as_object()
                .map_or(Vec::new(), |o| o.keys().cloned().collect())
        })
        .collect()
}

fn add_shared_answers(path: &str, op: &mut Operation) {
    let schemes = schemes(op);
    let api_token_only = schemes == [[BEARER]];
    let order_tracking = schemes == [[BEARER], [TRACKING_QUERY]];
    if api_token_only {
        answer(
            op,
            "401",
            "`unauthorized`: no bearer token, or an unknown one (with `WWW-Authenticate: Bearer`).",
        );
        answer(
            op,
            "403",
            "`forbidden`: the token's role may not use this route. `admin_disabled`: no role that may use it has a token configured.",
        );
    }
    if order_tracking {
        answer(op, "403", "`forbidden`: a producer token, whatever the id.");
        answer(
            op,
            "404",
            "`order_not_found`: an unknown id and a missing or wrong token alike.",
        );
    }
    if op.request_body.is_some() {
        answer(
            op,
            "408",
            "`body_timeout`: the body did not arrive within `http.body_timeout_ms`; the connection is closed.",
        );
    }
    if !RATE_LIMIT_EXEMPT.contains(&path) {
        answer(
            op,
            "429",
            "`rate_limited`: past the client's `http.rate_limit_per_s`; `Retry-After` says when to come back.",
        );
    }
    let problem = ContentBuilder::new()
        .schema(Some(RefOr::Ref(Ref::from_schema_name("Problem"))))
        .build();
    for (status, response) in op.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if response.description.contains(ORDER_REASONS) {
            let codes: Vec<String> = RejectReason::ALL
                .iter()
                .map(|r| format!("`{}`", r.code()))
                .collect();
            response.description = response
                .description
                .replace(ORDER_REASONS, &codes.join(", "));
        }
        let failure = status.parse::<u16>().is_ok_and(|s| s >= 400);
        if failure && response.content.is_empty() {
            response
                .content
                .insert(PROBLEM_JSON.to_owned(), RefOr::T(problem.clone()));
        }
    }
}

/// Adds `description` to the answer `status`, or the answer itself.
fn answer(op: &mut Operation, status: &str, description: &str) {
    let responses = &mut op.responses.responses;
    match responses.get_mut(status) {
        Some(RefOr::T(r)) => r.description = format!("{} {description}", r.description),
        _ => {
            let r = ResponseBuilder::new().description(description).build();
            responses.insert(status.to_owned(), RefOr::T(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::problem::Code;

    /// Every description of the document, with the path it belongs to.
    fn descriptions(doc: &OpenApi) -> Vec<String> {
        let json = serde_json::to_value(doc).unwrap();
        let mut out = Vec::new();
        for (path, item) in json["paths"].as_object().unwrap() {
            for (_, op) in item.as_object().unwrap() {
                for (_, r) in op["responses"].as_object().unwrap() {
                    out.push(format!("{path}: {}", r["description"]));
                }
            }
        }
        out.extend(doc.info.description.clone());
        out
    }

    /// Every operation has a summary of its own (one short line, not the
    /// route again) and a description that names its route.
    #[test]
    fn operations_have_summaries() {
        let json = serde_json::to_value(document()).unwrap();
        for (path, item) in json["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let summary = op["summary"].as_str().unwrap_or_default();
                let what = format!("{method} {path}: {summary:?}");
                assert!((8..=60).contains(&summary.len()), "{what}");
                assert!(!summary.contains(['\n', '`', '/']), "{what}");
                let description = op["description"].as_str().unwrap_or_default();
                let route = format!("`{} {path}", method.to_uppercase());
                assert!(
                    description.starts_with(&route),
                    "{method} {path}: {description:?}"
                );
            }
        }
    }

    /// Each problem code the server can answer is named by some answer of the document.
    #[test]
    fn document_names_every_problem_code() {
        let all = descriptions(&document()).join("\n");
        for code in Code::all() {
            let named = format!("`{}`", code.as_str());
            assert!(
                all.contains(&named),
                "{named} is in no answer of the document"
            );
        }
        assert!(!all.contains(ORDER_REASONS));
    }

    /// Every failure answer carries the problem+json body; every route needing a token documents 401.
    #[test]
    fn failures_are_problems_and_tokens_are_documented() {
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, r) in op["responses"].as_object().unwrap() {
                    let content = r["content"].as_object();
                    if status.as_str() >= "400" && path != "/track/{id}" {
                        assert!(
                            content.is_some_and(|c| c.contains_key(PROBLEM_JSON)),
                            "{method} {path} {status}"
                        );
                    }
                }
                let bearer_only = op["security"] == serde_json::json!([{ "bearer": [] }]);
                assert_eq!(
                    op["responses"].get("401").is_some(),
                    bearer_only,
                    "{method} {path}"
                );
            }
        }
    }

    /// docs/order-record.schema.json is the schema the code describes (`ORDERFLOW_BLESS=1` rewrites it).
    #[test]
    fn published_order_record_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/order-record.schema.json");
        let want = serde_json::to_string_pretty(&order_record::json_schema()).unwrap() + "\n";
        if std::env::var_os("ORDERFLOW_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "{path} is stale: run `ORDERFLOW_BLESS=1 cargo test --lib openapi`"
        );
    }
}
