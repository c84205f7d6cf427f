//! The web console under `/ui/`: an overview of the fleet that follows `GET /v2/events`, a
//! playground that chats through `/v1/chat/completions`, and operator actions through the same
//! HTTP endpoints as `llorch`. Static pages and plain scripts, embedded in the binary: no build
//! step, no external requests.
//!
//! The pages themselves hold no data and need no credential; everything they show comes from
//! the API, called by the page with the credential the user enters (kept in the tab's session
//! storage, sent as `Authorization: Bearer`, never as a cookie, so another site cannot make the
//! browser use it). Every answer here carries a Content-Security-Policy that allows only this
//! origin's scripts, styles and connections and forbids framing, and the API's browser checks
//! (Host, Origin, Content-Type: `api::boundary`) run before these routes as before any other.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::State;

/// What a console page may load and connect to: only this origin, nothing inline, no frames.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The embedded files: path under `/ui/`, content type, content.
const FILES: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "playground",
        "text/html; charset=utf-8",
        include_str!("assets/playground.html"),
    ),
    (
        "assets/common.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/common.js"),
    ),
    (
        "assets/overview.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/overview.js"),
    ),
    (
        "assets/playground.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/playground.js"),
    ),
    (
        "assets/console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
];

/// The console's routes (the caller adds the API's layers).
pub fn router() -> Router<std::sync::Arc<State>> {
    let mut r = Router::new().route("/ui", get(|| async { redirect("/ui/") }));
    for (path, content_type, body) in FILES {
        r = r.route(
            &format!("/ui/{path}"),
            get(move || async move { file(content_type, body) }),
        );
    }
    r
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(h);
    resp
}

/// The headers of every console answer.
fn secure(h: &mut HeaderMap) {
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        // Revalidated on every load: a new binary's pages are never mixed with old scripts.
        ("cache-control", "no-cache"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
}

/// A redirect (303) to the console's `to`, with the console's headers.
pub fn redirect(to: &'static str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    secure(resp.headers_mut());
    resp
}
