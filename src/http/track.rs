//! `GET /track/{id}?token=T`: the customer tracking page.
//!
//! One self-contained HTML page (`track.html`: inline CSS and JS, nothing
//! fetched from anywhere else) that shows the order's current status, its
//! reason and its timeline, rendered on the server (so it reads the same
//! without JavaScript); its script then follows
//! `/v1/orders/{id}/events?token=T` with an `EventSource` and updates the
//! page in place, closing the stream at a terminal status.
//!
//! Access is the API's: the tracking token (or an admin or reader token) as
//! `?token=`, checked by [`authorize_order`]. An unknown id, a missing
//! token and a wrong token all answer the same 404 page, byte for byte.
//!
//! Every value written into the page is HTML-escaped ([`html_escape`]):
//! order ids and reasons come from outside. Each page carries a fresh CSP
//! nonce for its one `<style>` and one `<script>`; the error pages have a
//! fixed body, so their style is allowed by its hash instead.

use std::sync::LazyLock;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::Ctx;
use super::auth::TokenQuery;
use super::routes::{Access, authorize_order};
use crate::domain::Status;
use crate::domain::time::rfc3339_ms;
use crate::sinks::tracking::TrackingView;

/// The page template; `{{name}}` placeholders are filled by [`fill`].
const PAGE: &str = include_str!("track.html");

/// The tracking page of an order.
///
/// `GET /track/{id}?token=T`: an HTML page that follows the order live.
#[utoipa::path(
    get,
    path = "/track/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "The order id.")),
    security(("tracking_token" = [])),
    responses(
        (status = 200, description = "The tracking page, which follows the order live.", content_type = "text/html", body = String),
        (status = 404, description = "A page saying the order is unknown: an unknown id and a missing, wrong or producer token alike.", content_type = "text/html", body = String),
        (status = 503, description = "A page asking to come back later.", content_type = "text/html", body = String),
    ),
)]
pub(crate) async fn track_page(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    let state = &ctx.app;
    let Ok(Path(id)) = path else {
        return not_found_page();
    };
    let query = query.map(|q| q.0).unwrap_or_default();
    // Only `?token=` counts: the page's script can pass on nothing else to
    // the event stream.
    let access = match authorize_order(state, &id, &HeaderMap::new(), &query).await {
        Ok(access) => access,
        // The page is for customers: a producer's token in its address is
        // a mistake the problem body of the API explains, not this page.
        Err(p) if p.status == StatusCode::NOT_FOUND || p.status == StatusCode::FORBIDDEN => {
            return not_found_page();
        }
        Err(_) => return unavailable_page(state.config.retry_after_s),
    };
    let view = state.tracking.get(&id);
    if view.is_none() && matches!(access, Access::Credential) {
        return not_found_page();
    }
    let nonce = BASE64.encode(rand::random::<[u8; 16]>());
    let html = render_page(&id, view.as_ref(), &nonce);
    html_response(StatusCode::OK, html, &page_csp(&nonce))
}

/// `&`, `<`, `>`, `"` and `'` as character references: safe in element
/// content and in quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How the page shows one status; the script gets the same table as JSON.
#[derive(Serialize)]
struct StatusInfo {
    label: String,
    phase: &'static str,
    /// `progress`, `ok` or `fail`: the colour of the status box (never
    /// the only cue: the label, icon and phase say the same in words).
    kind: &'static str,
    icon: &'static str,
    text: &'static str,
    terminal: bool,
}

fn status_info(s: Status) -> StatusInfo {
    let text = match s {
        Status::Accepted => "We have received your order and are checking it.",
        Status::Reserved => "Your items are reserved; the payment is being processed.",
        Status::Paid => "Your payment is authorised; the order is being confirmed.",
        Status::Confirmed => "Your order is confirmed.",
        Status::Rejected => "The order could not be accepted; nothing was charged.",
        Status::OutOfStock => "An item in your order is out of stock; nothing was charged.",
        Status::PaymentDeclined => "The payment was declined; nothing was charged.",
        Status::PaymentFailed => "The payment could not be processed; nothing was charged.",
    };
    let (kind, icon, phase) = match s {
        Status::Confirmed => ("ok", "✓", "final"),
        s if s.is_terminal() => ("fail", "✗", "final"),
        _ => ("progress", "→", "in progress"),
    };
    StatusInfo {
        label: s.as_str().replace('_', " "),
        phase,
        kind,
        icon,
        text,
        terminal: s.is_terminal(),
    }
}

/// The status table as JSON that is safe inside a `<script>` element.
fn status_info_json() -> String {
    let table: serde_json::Map<String, serde_json::Value> = Status::ALL
        .iter()
        .map(|s| {
            let info = serde_json::to_value(status_info(*s)).expect("a status always serializes");
            (s.as_str().to_owned(), info)
        })
        .collect();
    serde_json::to_string(&table)
        .expect("a status table always serializes")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// `2024-05-01 12:30:00 UTC`, as the page's script shows times too.
fn shown_time(at_ms: u64) -> (String, String) {
    let at = rfc3339_ms(at_ms);
    let shown = format!("{} {} UTC", &at[..10], &at[11..19]);
    (at, shown)
}

/// The page for an order; `view` is `None` for an order accepted by
/// intake that the read model has not seen yet.
fn render_page(order_id: &str, view: Option<&TrackingView>, nonce: &str) -> String {
    let status = view.map_or(Status::Accepted, |v| v.status);
    let reason = view.and_then(|v| v.reason.as_deref());
    let info = status_info(status);
    let mut timeline = String::new();
    for h in view.map(|v| v.history.as_slice()).unwrap_or_default() {
        let (at, shown) = shown_time(h.at_ms);
        timeline.push_str(&format!(
            "<li data-seq=\"{seq}\" data-status=\"{status}\"><span class=\"tl-seq\">{seq}.</span>\
             <span class=\"tl-status\">{label}</span><time datetime=\"{at}\">{shown}</time></li>\n",
            seq = h.seq,
            status = html_escape(h.status.as_str()),
            label = html_escape(&status_info(h.status).label),
            at = html_escape(&at),
            shown = html_escape(&shown),
        ));
    }
    let noscript_reason = reason
        .map(|r| format!(" (reason: <code>{}</code>)", html_escape(r)))
        .unwrap_or_default();
    fill(
        PAGE,
        &[
            ("nonce", &html_escape(nonce)),
            ("order_id", &html_escape(order_id)),
            ("status", &html_escape(status.as_str())),
            (
                "final",
                if status.is_terminal() {
                    "true"
                } else {
                    "false"
                },
            ),
            ("kind", info.kind),
            ("icon", info.icon),
            ("label", &html_escape(&info.label)),
            ("phase", info.phase),
            ("description", &html_escape(info.text)),
            ("reason", &html_escape(reason.unwrap_or(""))),
            (
                "reason_hidden",
                if reason.is_some() { "" } else { " hidden" },
            ),
            ("noscript_reason", &noscript_reason),
            ("timeline", &timeline),
            (
                "empty_hidden",
                if timeline.is_empty() { "" } else { " hidden" },
            ),
            ("status_info", &status_info_json()),
        ],
    )
}

/// Replaces each `{{name}}` of `template` with its value, in one pass: a
/// value is never scanned for placeholders itself. Panics on a placeholder
/// without a value (a broken template; the unit tests render it).
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 2048);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("track.html: unclosed placeholder");
        let name = &after[..end];
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("track.html: no value for placeholder {name:?}"))
            .1;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn page_csp(nonce: &str) -> String {
    format!(
        "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
}

/// The style of the error pages, allowed by its hash (their body is fixed).
const ERROR_STYLE: &str = "body{margin:0;background:#f3f4f6;color:#1b1b1b;\
font:16px/1.5 system-ui,-apple-system,\"Segoe UI\",Roboto,Arial,\"Liberation Sans\",\"DejaVu Sans\",sans-serif}\
main{max-width:40rem;margin:1.5rem auto;padding:1.25rem 1.5rem;background:#fff;border:1px solid #b8bcc2;border-radius:8px}\
h1{margin:0 0 .5rem;font-size:1.5rem}p{margin:.5rem 0 0}";

struct ErrorPage {
    body: String,
    csp: String,
}

fn error_page(title: &str, message: &str) -> ErrorPage {
    let hash = BASE64.encode(Sha256::digest(ERROR_STYLE.as_bytes()));
    ErrorPage {
        body: format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <meta name=\"referrer\" content=\"no-referrer\">\n\
             <title>{title} · orderflow</title>\n<style>{ERROR_STYLE}</style>\n</head>\n\
             <body>\n<main>\n<h1>{title}</h1>\n<p>{message}</p>\n</main>\n</body>\n</html>\n",
            title = html_escape(title),
            message = html_escape(message),
        ),
        csp: format!(
            "default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        ),
    }
}

/// The one answer for an unknown order, a missing and a wrong token.
static NOT_FOUND: LazyLock<ErrorPage> = LazyLock::new(|| {
    error_page(
        "Order not found",
        "There is no order to show at this address. Check that you opened the \
         complete tracking link from your order confirmation.",
    )
});

static UNAVAILABLE: LazyLock<ErrorPage> = LazyLock::new(|| {
    error_page(
        "Tracking unavailable",
        "Order tracking is unavailable right now. Please try again in a moment.",
    )
});

fn not_found_page() -> Response {
    html_response(
        StatusCode::NOT_FOUND,
        NOT_FOUND.body.clone(),
        &NOT_FOUND.csp,
    )
}

fn unavailable_page(retry_after_s: u32) -> Response {
    let mut res = html_response(
        StatusCode::SERVICE_UNAVAILABLE,
        UNAVAILABLE.body.clone(),
        &UNAVAILABLE.csp,
    );
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
    res
}

/// An HTML answer with the page's security headers.
fn html_response(status: StatusCode, body: String, csp: &str) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tracking::HistoryEntry;

    #[test]
    fn html_escape_escapes_the_five_characters() {
        assert_eq!(html_escape(""), "");
        assert_eq!(html_escape("ord-1001_a.b:c"), "ord-1001_a.b:c");
        assert_eq!(
            html_escape(r#"<script>alert("x")</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
        );
        assert_eq!(html_escape("a & b"), "a &amp; b");
        assert_eq!(html_escape("it's"), "it&#39;s");
        // Already-escaped text is escaped again (no double-unescape tricks).
        assert_eq!(html_escape("&lt;"), "&amp;lt;");
        // Non-ASCII passes through untouched.
        assert_eq!(html_escape("café ✓ 注文"), "café ✓ 注文");
        assert_eq!(html_escape("\"'><"), "&quot;&#39;&gt;&lt;");
    }

    #[test]
    fn fill_is_one_pass() {
        let out = fill("a{{x}}b{{y}}c{{x}}", &[("x", "{{y}}"), ("y", "<")]);
        assert_eq!(out, "a{{y}}b<c{{y}}");
    }

    fn view(status: Status, reason: Option<&str>, id: &str) -> TrackingView {
        let path: &[Status] = match status {
            Status::Confirmed => &[
                Status::Accepted,
                Status::Reserved,
                Status::Paid,
                Status::Confirmed,
            ],
            Status::Reserved => &[Status::Accepted, Status::Reserved],
            s => &[Status::Accepted, s],
        };
        TrackingView {
            order_id: id.to_owned(),
            status,
            reason: reason.map(str::to_owned),
            history: path
                .iter()
                .enumerate()
                .map(|(i, s)| HistoryEntry {
                    seq: i as u32 + 1,
                    status: *s,
                    at_ms: 1_700_000_000_000 + i as u64 * 1500,
                })
                .collect(),
        }
    }

    #[test]
    fn page_escapes_every_value_and_fills_every_placeholder() {
        let id = "ord-\"><img src=x>";
        let reason = "</code><script>alert(1)</script>&";
        let v = view(Status::PaymentDeclined, Some(reason), id);
        let html = render_page(id, Some(&v), "bm9uY2U=");
        assert!(!html.contains("{{"), "a placeholder was left: {html}");
        assert!(!html.contains("<img"));
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("ord-&quot;&gt;&lt;img src=x&gt;"));
        assert!(html.contains("&lt;/code&gt;&lt;script&gt;alert(1)&lt;/script&gt;&amp;"));
        // Exactly one executable script and one style, both with the nonce.
        assert_eq!(html.matches("<script nonce=\"bm9uY2U=\">").count(), 1);
        assert_eq!(html.matches("<style nonce=\"bm9uY2U=\">").count(), 1);
        assert_eq!(html.matches("<script").count(), 2); // + the JSON data block
        assert!(html.contains("<script type=\"application/json\" id=\"status-info\">"));
        assert!(html.contains("data-status=\"payment_declined\""));
        assert!(html.contains("data-final=\"true\""));
        assert!(html.contains("<strong id=\"status-text\">payment declined</strong>"));
        assert!(html.contains("<p id=\"status-reason\">"));
    }

    #[test]
    fn page_shows_status_timeline_and_accessibility_markup() {
        let v = view(Status::Confirmed, None, "ord-1");
        let html = render_page("ord-1", Some(&v), "n");
        assert!(html.starts_with("<!doctype html>\n<html lang=\"en\">"));
        assert!(html.contains("aria-live=\"polite\""));
        assert!(html.contains("<h1>Order <code>ord-1</code></h1>"));
        assert!(html.contains("<ol id=\"timeline\" class=\"timeline\">"));
        assert_eq!(html.matches("<li data-seq=").count(), 4);
        let order: Vec<usize> = ["accepted", "reserved", "paid", "confirmed"]
            .iter()
            .map(|s| html.find(&format!("data-status=\"{s}\"><span")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert!(html.contains(
            "<time datetime=\"2023-11-14T22:13:20.000Z\">2023-11-14 22:13:20 UTC</time>"
        ));
        assert!(html.contains("<p id=\"status-reason\" hidden>"));
        assert!(html.contains("<p id=\"timeline-empty\" class=\"note\" hidden>"));
        assert!(html.contains("<noscript>"));
        assert!(html.contains("data-final=\"true\""));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn just_accepted_page_has_an_empty_timeline() {
        let html = render_page("ord-2", None, "n");
        assert!(!html.contains("{{"));
        assert!(html.contains("data-status=\"accepted\""));
        assert!(html.contains("data-final=\"false\""));
        assert!(html.contains("<p id=\"timeline-empty\" class=\"note\">"));
        assert!(!html.contains("<li"));
    }

    #[test]
    fn status_table_is_script_safe_json() {
        let json = status_info_json();
        assert!(!json.contains('<') && !json.contains('>'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for s in Status::ALL {
            assert_eq!(v[s.as_str()]["terminal"], s.is_terminal());
        }
        assert_eq!(v["out_of_stock"]["label"], "out of stock");
    }

    #[test]
    fn error_page_style_matches_its_csp_hash() {
        let page = &*NOT_FOUND;
        let start = page.body.find("<style>").unwrap() + "<style>".len();
        let end = page.body.find("</style>").unwrap();
        let hash = BASE64.encode(Sha256::digest(&page.body.as_bytes()[start..end]));
        assert!(page.csp.contains(&format!("'sha256-{hash}'")));
        assert!(page.body.contains("<html lang=\"en\">"));
        assert!(page.body.contains("<h1>Order not found</h1>"));
    }

    #[test]
    fn page_csp_allows_only_the_nonce() {
        let csp = page_csp("abc");
        assert!(csp.contains("script-src 'nonce-abc';"));
        assert!(csp.contains("style-src 'nonce-abc';"));
        assert!(!csp.contains("unsafe"));
    }
}
