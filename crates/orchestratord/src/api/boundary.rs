//! What a web browser may do with the API: the checks that run before any route.
//!
//! A page the user visits can make the browser send requests to `127.0.0.1:8080`. Three checks
//! keep such a page from driving the API (docs/SECURITY.md, "A web page in the user's browser"):
//!
//! - **Host** (DNS rebinding): on a loopback listener, or wherever `--allowed-hosts` is given,
//!   the `Host` must be a loopback name or address, the listener's own address, or a listed
//!   name; anything else is 421 (`/health/*` excepted: probes name hosts as they like). A page whose own name was made to resolve to 127.0.0.1 still
//!   sends its own name as `Host`.
//! - **Origin** (cross-site requests): a request carrying an `Origin` that is neither the
//!   `Host` it was sent to nor listed in `--cors-origins` is 403, preflight included. Listed
//!   origins get CORS answers (`Access-Control-Allow-Origin` naming them, `Vary: Origin`).
//! - **Content-Type**: a request with a body must say `application/json` (or a `+json` type);
//!   otherwise 415. A browser sends `text/plain` and form bodies without asking the server
//!   first, `application/json` only after a preflight that the Origin check refuses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use llorch_wire::{ErrorBody, ErrorCode};

use super::{ApiError, Envelope};
use crate::config::CorsOrigins;

/// The checks' settings, fixed when the listener is known.
#[derive(Debug, Clone)]
pub struct Boundary {
    /// Check `Host` (a loopback listener, or `--allowed-hosts` given).
    check_host: bool,
    /// The listener's own address, a valid `Host` too.
    local: Option<IpAddr>,
    /// `--allowed-hosts`, lower case, without ports.
    allowed_hosts: Vec<String>,
    cors: CorsOrigins,
}

impl Boundary {
    pub fn new(local: Option<SocketAddr>, allowed_hosts: &[String], cors: CorsOrigins) -> Self {
        let any_host = allowed_hosts.iter().any(|h| h == "*");
        let loopback = local.is_none_or(|a| a.ip().is_loopback());
        Self {
            check_host: !any_host && (loopback || !allowed_hosts.is_empty()),
            local: local.map(|a| a.ip()),
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            cors,
        }
    }

    /// Whether `host` (a `Host` header's value) names this listener.
    fn host_allowed(&self, host: &str) -> bool {
        if !self.check_host {
            return true;
        }
        let name = host_name(host).to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            if ip.is_loopback() || Some(ip) == self.local {
                return true;
            }
        }
        self.allowed_hosts.contains(&name)
    }
}

/// The name part of a `Host` value: `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The authority of an origin: `http://a.b:8080` → `a.b:8080`.
fn origin_authority(origin: &str) -> Option<&str> {
    origin
        .split_once("://")
        .map(|(_, a)| a)
        .filter(|a| !a.is_empty())
}

fn refuse(path: &str, status: StatusCode, code: ErrorCode, message: String) -> Response {
    ApiError {
        status,
        body: ErrorBody::new(code, message),
        envelope: Envelope::of_path(path),
    }
    .into_response()
}

/// What a browser may send without asking first; anything else must be JSON.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Whether the request carries a body (a length above zero, or chunks).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";
const ALLOW_HEADERS: &str = "authorization, content-type, x-api-key, x-correlation-id";

/// The middleware: runs the three checks, answers CORS preflights, and adds CORS headers to
/// the answers of listed origins.
pub async fn guard(
    axum::extract::State(b): axum::extract::State<Arc<Boundary>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let headers = req.headers();
    // A missing or unreadable Host reads as the empty name, which no check allows (browsers
    // always send one).
    let host = Some(
        req.uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            }),
    );
    // Liveness and readiness say nothing a page could use, and probes name the host as they
    // like (a service name, a pod address).
    let probe = path.starts_with("/health/");
    if let Some(host) = host.as_ref().filter(|_| !probe) {
        if !b.host_allowed(host) {
            tracing::info!(host = %host, path = %path, "Refused a request for a host this listener does not serve.");
            return refuse(
                &path,
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::Forbidden,
                format!(
                    "this server does not answer for the host {host:?}; an operator who reaches it by that name lists it in --allowed-hosts (LLORCH_ALLOWED_HOSTS)"
                ),
            );
        }
    }
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("null").to_string());
    let mut cors = None;
    if let Some(origin) = &origin {
        let same = host
            .as_deref()
            .is_some_and(|h| origin_authority(origin).is_some_and(|a| a.eq_ignore_ascii_case(h)));
        if b.cors.allows(origin) {
            cors = Some(origin.clone());
        } else if !same {
            tracing::info!(origin = %origin, path = %path, "Refused a cross-origin request.");
            return refuse(
                &path,
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!(
                    "cross-origin requests from {origin:?} are refused; to let a web page at that origin call this API, list it in --cors-origins (LLORCH_CORS_ORIGINS)"
                ),
            );
        }
    }
    if req.method() == Method::OPTIONS && origin.is_some() {
        // A preflight of an allowed (or the same) origin.
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert("access-control-max-age", HeaderValue::from_static("600"));
        add_cors(h, cors.as_deref());
        return resp;
    }
    if has_body(headers) && !is_json(headers) {
        let got = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        return refuse(
            &path,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InvalidParams,
            format!(
                "the request body must be JSON: send `Content-Type: application/json` (got {got:?})"
            ),
        );
    }
    let mut resp = next.run(req).await;
    add_cors(resp.headers_mut(), cors.as_deref());
    resp
}

fn add_cors(h: &mut HeaderMap, origin: Option<&str>) {
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(v) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        h.insert("access-control-allow-origin", v);
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("x-correlation-id, retry-after"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_on_loopback() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let b = Boundary::new(Some(local), &["box.lan".into()], CorsOrigins::None);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:8080",
            "127.0.0.2",
            "box.lan:8080",
        ] {
            assert!(b.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "10.0.0.1:8080",
            "localhost.evil.example",
        ] {
            assert!(!b.host_allowed(bad), "{bad}");
        }
        // Off loopback and nothing listed: keys guard it, any name reaches it.
        let open = Boundary::new(
            Some("0.0.0.0:8080".parse().unwrap()),
            &[],
            CorsOrigins::None,
        );
        assert!(open.host_allowed("api.example.com"));
        let any = Boundary::new(Some(local), &["*".into()], CorsOrigins::None);
        assert!(any.host_allowed("evil.example"));
    }

    #[test]
    fn cors_origins_parse() {
        assert_eq!(CorsOrigins::parse(&[]).unwrap(), CorsOrigins::None);
        assert_eq!(CorsOrigins::parse(&["*".into()]).unwrap(), CorsOrigins::Any);
        assert_eq!(
            CorsOrigins::parse(&["https://Chat.example.com/".into()]).unwrap(),
            CorsOrigins::List(vec!["https://chat.example.com".into()])
        );
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://x/path",
            "*,https://x",
        ] {
            let v: Vec<String> = bad.split(',').map(str::to_string).collect();
            assert!(CorsOrigins::parse(&v).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!with("multipart/form-data; boundary=x"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
