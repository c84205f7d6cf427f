//! A client for one llama-orch HTTP endpoint, over TCP (`http://host:port`), TLS
//! (`https://host:port`, verified against [`TlsRoots`]) or a Unix socket (`unix:/path/to.sock`). orchestratord uses it to reach nodes, pool-managerd to reach the
//! control plane, and the CLI to reach orchestratord.
//!
//! Connections are pooled and reused (hyper-util's client), over TCP and over Unix sockets
//! alike. A connection goes back to the pool only after its response was read to the end; a
//! stream dropped midway (a cancelled task) closes its connection, so the server sees the
//! cancellation and no half-read stream is ever reused.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client as Pooled;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::{error_from_response, ClientError, EventStream, TlsRoots};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};

/// How long a connection may take to be established, over TCP or a Unix socket: a peer whose
/// listen queue is full, or an address that drops packets, is reported unreachable instead of
/// holding the caller.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to a Unix socket within [`CONNECT_TIMEOUT`]: a server whose backlog is full (a
/// wedged process holding its socket) leaves `connect` waiting, which must not hold a caller.
pub(crate) async fn connect_unix(path: &std::path::Path) -> std::io::Result<UnixStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not accepted within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
}

#[derive(Clone)]
enum Target {
    Unix(Pooled<UnixConnector, Full<Bytes>>),
    Tcp {
        base: String,
        pooled: Pooled<HttpConnector, Full<Bytes>>,
    },
    Tls {
        base: String,
        pooled: Pooled<HttpsConnector<HttpConnector>, Full<Bytes>>,
    },
}

/// A client for one endpoint, with an optional bearer token sent on every request.
#[derive(Clone)]
pub struct HttpClient {
    target: Target,
    token: Option<String>,
    address: String,
}

/// Connects hyper-util's pooled client to one Unix socket, whatever the URI says.
#[derive(Clone)]
struct UnixConnector(Arc<PathBuf>);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = UnixConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<UnixConnection>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let stream = connect_unix(&path)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            Ok(UnixConnection(TokioIo::new(stream)))
        })
    }
}

struct UnixConnection(TokioIo<UnixStream>);

impl Connection for UnixConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UnixConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UnixConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("address", &self.address)
            .finish()
    }
}

impl HttpClient {
    /// `unix:/path/to.sock`, `http://host:port` or `https://host:port` (a trailing `/` is
    /// ignored); `https://` trusts the system's CA store.
    pub fn new(address: &str) -> Result<Self, ClientError> {
        Self::with_roots(address, &TlsRoots::system())
    }

    /// Like [`new`](Self::new), with the CAs an `https://` address is verified against.
    pub fn with_roots(address: &str, roots: &TlsRoots) -> Result<Self, ClientError> {
        let target = if let Some(path) = address.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(ClientError::Address(address.into()));
            }
            let connector = UnixConnector(Arc::new(PathBuf::from(path)));
            Target::Unix(Pooled::builder(TokioExecutor::new()).build(connector))
        } else if let Some((scheme, rest)) = address
            .strip_prefix("http://")
            .map(|r| ("http", r))
            .or_else(|| address.strip_prefix("https://").map(|r| ("https", r)))
        {
            let rest = rest.trim_end_matches('/');
            // The whole authority must parse as a URI's (`host[:port]`, no user info), so every
            // request built on it is valid; an address such as `http://bad host:1` is refused
            // here rather than when a request is formed.
            let parsed = Uri::try_from(format!("{scheme}://{rest}/")).ok();
            let authority_ok = parsed.as_ref().is_some_and(|u| {
                let (Some(authority), Some(host)) = (u.authority(), u.host()) else {
                    return false;
                };
                // What follows the host is nothing or `:` and a port number.
                let port = authority.as_str().get(host.len()..).unwrap_or("x");
                let port_ok = port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok());
                !host.is_empty()
                    && authority.as_str().starts_with(host)
                    && port_ok
                    && u.path() == "/"
                    && u.query().is_none()
            });
            if rest.is_empty() || rest.contains('/') || !authority_ok {
                return Err(ClientError::Address(address.into()));
            }
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            let base = format!("{scheme}://{rest}");
            if scheme == "https" {
                connector.enforce_http(false);
                let https = HttpsConnectorBuilder::new()
                    .with_tls_config(roots.config())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(connector);
                Target::Tls {
                    base,
                    pooled: Pooled::builder(TokioExecutor::new()).build(https),
                }
            } else {
                Target::Tcp {
                    base,
                    pooled: Pooled::builder(TokioExecutor::new()).build(connector),
                }
            }
        } else {
            return Err(ClientError::Address(address.into()));
        };
        Ok(Self {
            target,
            token: None,
            address: address.trim_end_matches('/').to_string(),
        })
    }

    /// Whether requests travel encrypted or stay on this host's Unix socket.
    pub fn is_tls(&self) -> bool {
        matches!(self.target, Target::Tls { .. })
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// A request builder for `path` on this endpoint, with the host and token headers set.
    pub fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let uri = match &self.target {
            // The pooled client needs an absolute URI; the connector ignores its authority.
            Target::Unix(_) => format!("http://localhost{path}"),
            Target::Tcp { base, .. } | Target::Tls { base, .. } => format!("{base}{path}"),
        };
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b
    }

    /// Finishes a request from [`request`](Self::request): a path or header that is not valid
    /// HTTP is the caller's error, reported, never a panic.
    pub fn build(
        &self,
        builder: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        builder
            .body(Full::new(body))
            .map_err(|e| ClientError::Request {
                address: self.address.clone(),
                reason: e.to_string(),
            })
    }

    /// Sends a request and returns the response head with its streaming body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        let sent = match &self.target {
            Target::Unix(pooled) => pooled.request(req).await,
            Target::Tcp { pooled, .. } => pooled.request(req).await,
            Target::Tls { pooled, .. } => pooled.request(req).await,
        };
        sent.map_err(|e| {
            if e.is_connect() {
                ClientError::Unreachable {
                    address: self.address.clone(),
                    reason: error_chain(&e),
                }
            } else {
                self.transport(e)
            }
        })
    }

    fn transport(&self, e: impl std::error::Error) -> ClientError {
        ClientError::Transport {
            address: self.address.clone(),
            reason: error_chain(&e),
        }
    }

    /// `GET path`; a success status decodes the JSON body, any other becomes
    /// [`ClientError::Status`].
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.build(self.request(Method::GET, path), Bytes::new())?;
        let resp = self.send(req).await?;
        self.json_answer(resp).await
    }

    /// `POST path` with a JSON body; a success status decodes the JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self
            .post_raw(
                path,
                serde_json::to_vec(body).expect("bodies serialize"),
                &[],
            )
            .await?;
        self.json_answer(resp).await
    }

    /// `POST path` with raw JSON bytes and extra headers; returns the response as it came.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, ClientError> {
        let mut req = self.build(
            self.request(Method::POST, path)
                .header("content-type", "application/json"),
            body.into(),
        )?;
        for (k, v) in headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        self.send(req).await
    }

    /// `GET path` of an SSE stream.
    pub async fn events(&self, path: &str) -> Result<EventStream, ClientError> {
        let req = self.build(
            self.request(Method::GET, path)
                .header("accept", "text/event-stream"),
            Bytes::new(),
        )?;
        let resp = self.send(req).await?;
        EventStream::from_response(resp, std::path::Path::new(&self.address)).await
    }

    async fn json_answer<T: DeserializeOwned>(
        &self,
        resp: Response<Incoming>,
    ) -> Result<T, ClientError> {
        if !resp.status().is_success() {
            return Err(error_from_response(resp).await);
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e))?
            .to_bytes();
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&body))))
    }
}

/// The status of a [`ClientError::Status`], if it is one.
pub fn status_of(err: &ClientError) -> Option<StatusCode> {
    match err {
        ClientError::Status { status, .. } => Some(*status),
        _ => None,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_that_form_requests_make_a_client() {
        for good in [
            "http://127.0.0.1:9200",
            "http://127.0.0.1:9200/",
            "http://[::1]:9200",
            "http://worker-1.lan:9200",
            "http://worker-1.lan",
            "https://worker-1.lan:9200",
            "https://[::1]:9200/",
            "unix:/run/llama-orch/pool-managerd.sock",
        ] {
            let client = HttpClient::new(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            client
                .build(client.request(Method::GET, "/v2/pools"), Bytes::new())
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "http://bad host:1",
            "http://",
            "http://h:1/path",
            "http://user@h:1",
            "http://[::1:1",
            "http://h:port",
            "http://h:1?q",
            "https://bad host:1",
            "https://h:1/x",
            "ftp://h:1",
            "unix:",
            "h:1",
        ] {
            assert!(
                matches!(HttpClient::new(bad), Err(ClientError::Address(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_request_that_cannot_be_formed_is_an_error_not_a_panic() {
        let client = HttpClient::new("http://127.0.0.1:9200").unwrap();
        let err = client
            .build(client.request(Method::GET, "/v2/pools/a b"), Bytes::new())
            .unwrap_err();
        assert!(matches!(err, ClientError::Request { .. }), "{err}");
    }
}
