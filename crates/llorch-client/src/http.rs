//! A client for one llama-orch HTTP endpoint, over TCP (`http://host:port`) or a Unix socket
//! (`unix:/path/to.sock`). orchestratord uses it to reach nodes, pool-managerd to reach the
//! control plane, and the CLI to reach orchestratord.
//!
//! TCP connections are pooled and reused (hyper-util's client); a Unix socket connection costs
//! microseconds, so each Unix request opens its own, which also keeps a cancelled stream's
//! connection from ever being reused.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Pooled;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::{error_from_response, ClientError, EventStream};

#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    Tcp { base: String },
}

/// A client for one endpoint, with an optional bearer token sent on every request.
#[derive(Clone)]
pub struct HttpClient {
    target: Target,
    pooled: Pooled<HttpConnector, Full<Bytes>>,
    token: Option<String>,
    address: String,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("address", &self.address)
            .finish()
    }
}

impl HttpClient {
    /// `unix:/path/to.sock` or `http://host:port` (a trailing `/` is ignored).
    pub fn new(address: &str) -> Result<Self, ClientError> {
        let target = if let Some(path) = address.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ClientError::Address(address.into()));
            }
            Target::Unix(PathBuf::from(path))
        } else if let Some(rest) = address.strip_prefix("http://") {
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() || rest.contains('/') {
                return Err(ClientError::Address(address.into()));
            }
            Target::Tcp {
                base: format!("http://{rest}"),
            }
        } else {
            return Err(ClientError::Address(address.into()));
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let pooled = Pooled::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            target,
            pooled,
            token: None,
            address: address.trim_end_matches('/').to_string(),
        })
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
            Target::Unix(_) => path.to_string(),
            Target::Tcp { base } => format!("{base}{path}"),
        };
        let mut b = Request::builder().method(method).uri(uri);
        if matches!(self.target, Target::Unix(_)) {
            b = b.header("host", "localhost");
        }
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b
    }

    /// Sends a request and returns the response head with its streaming body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        match &self.target {
            Target::Unix(path) => {
                let stream =
                    UnixStream::connect(path)
                        .await
                        .map_err(|source| ClientError::Connect {
                            path: path.clone(),
                            source,
                        })?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| self.transport(e))?;
                tokio::spawn(async move {
                    // The connection ends when the response body is dropped or finished.
                    let _ = conn.await;
                });
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| self.transport(e))
            }
            Target::Tcp { .. } => self.pooled.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ClientError::Unreachable {
                        address: self.address.clone(),
                        reason: error_chain(&e),
                    }
                } else {
                    self.transport(e)
                }
            }),
        }
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
        let req = self
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .expect("valid request");
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
        let mut req = self
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .expect("valid request");
        for (k, v) in headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        self.send(req).await
    }

    /// `GET path` of an SSE stream.
    pub async fn events(&self, path: &str) -> Result<EventStream, ClientError> {
        let req = self
            .request(Method::GET, path)
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new()))
            .expect("valid request");
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
