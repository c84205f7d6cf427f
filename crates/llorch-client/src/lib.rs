//! HTTP/1.1 client for llama-orch sockets, with an SSE decoder for event streams.
//!
//! [`UnixClient`] speaks to an engine's Unix socket (tests, the bench, pool-managerd);
//! [`HttpClient`] speaks to orchestratord and pool-managerd over TCP or a Unix socket. The crate
//! owns connection setup and SSE decoding, not retries or policy.

mod http;
mod tls;
pub use http::{status_of, HttpClient, CONNECT_TIMEOUT};
pub use tls::{leaves_host_in_clear, names_this_host, TlsRoots};

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use llorch_wire::engine::{EndEvent, EngineEvent, GenerateRequest, Health, SlotsStatus};
use llorch_wire::sse::{Decoder, Frame};
use llorch_wire::ErrorBody;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP error talking to {path}: {source}")]
    Http { path: PathBuf, source: hyper::Error },
    /// The server answered with an error status and (usually) a typed body.
    #[error("{status}: {}", .body.as_ref().map(|b| b.to_string()).unwrap_or_else(|| .raw.clone()))]
    Status {
        status: StatusCode,
        /// Boxed: the typed body is large next to the other variants.
        body: Option<Box<ErrorBody>>,
        raw: String,
        retry_after: Option<String>,
    },
    #[error("cannot reach {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("HTTP error talking to {address}: {reason}")]
    Transport { address: String, reason: String },
    #[error("bad address {0:?}: use unix:/path/to.sock, http://host:port or https://host:port")]
    Address(String),
    /// A CA file that cannot be used.
    #[error(
        "CA file {path}: {reason}; give a PEM file of the CA that signed the server's certificate"
    )]
    Tls { path: PathBuf, reason: String },
    /// The request could not be formed (a path or header that is not valid HTTP): the caller's
    /// input, never worth a retry.
    #[error("cannot form a request to {address}: {reason}")]
    Request { address: String, reason: String },
    #[error("bad response: {0}")]
    Decode(String),
    #[error("the stream ended without an end or error event")]
    Truncated,
}

/// A client for one Unix socket. Each request uses its own connection: on a Unix socket that
/// costs microseconds, and it keeps a cancelled stream's connection from being reused.
#[derive(Debug, Clone)]
pub struct UnixClient {
    path: PathBuf,
}

impl UnixClient {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request and returns the response head with its streaming body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        let stream =
            http::connect_unix(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http(e))?;
        tokio::spawn(async move {
            // The connection ends when the response body is dropped or finished.
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(|e| self.http(e))
    }

    fn http(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            path: self.path.clone(),
            source,
        }
    }

    fn bad_request(&self, e: hyper::http::Error) -> ClientError {
        ClientError::Request {
            address: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// `GET path`: the status and the whole body.
    pub async fn get_bytes(&self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .map_err(|e| self.bad_request(e))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http(e))?
            .to_bytes();
        Ok((status, body))
    }

    /// `GET path`, decoding a JSON body whatever the status.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<(StatusCode, T), ClientError> {
        let (status, body) = self.get_bytes(path).await?;
        let value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&body))))?;
        Ok((status, value))
    }

    /// `POST path` with raw bytes as the JSON body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        let req = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .map_err(|e| self.bad_request(e))?;
        self.send(req).await
    }

    pub async fn health(&self) -> Result<(StatusCode, Health), ClientError> {
        self.get_json("/health").await
    }

    pub async fn slots(&self) -> Result<SlotsStatus, ClientError> {
        Ok(self.get_json("/slots").await?.1)
    }

    /// Starts a generation. Errors before the stream starts come back as
    /// [`ClientError::Status`] with the engine's typed body.
    pub async fn generate(&self, req: &GenerateRequest) -> Result<EventStream, ClientError> {
        let body = serde_json::to_vec(req).expect("requests serialize");
        let resp = self.post_raw("/generate", body).await?;
        EventStream::from_response(resp, &self.path).await
    }
}

/// Turns a non-success response into [`ClientError::Status`].
/// The most of an error answer's body that is read: typed error bodies are a few hundred bytes.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// How long an error answer's body may take to arrive: a peer that sends an error's head and
/// then stalls must not hold the caller (and whatever it holds, a slot lease) forever.
pub const ERROR_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn error_from_response(resp: Response<Incoming>) -> ClientError {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY_BYTES).collect();
    let raw = match tokio::time::timeout(ERROR_BODY_TIMEOUT, body).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Ok(Err(e)) => format!("(body unreadable: {e})"),
        Err(_) => format!("(no whole body within {} s)", ERROR_BODY_TIMEOUT.as_secs()),
    };
    ClientError::Status {
        status,
        body: serde_json::from_str(&raw).ok().map(Box::new),
        raw,
        retry_after,
    }
}

/// An SSE response body, decoded frame by frame as bytes arrive.
pub struct EventStream {
    body: Incoming,
    decoder: Decoder,
    ready: VecDeque<Frame>,
    path: PathBuf,
}

/// The text and end event of a finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<String>,
    pub end: EndEvent,
}

impl EventStream {
    pub async fn from_response(resp: Response<Incoming>, path: &Path) -> Result<Self, ClientError> {
        if resp.status() != StatusCode::OK {
            return Err(error_from_response(resp).await);
        }
        Ok(Self {
            body: resp.into_body(),
            decoder: Decoder::default(),
            ready: VecDeque::new(),
            path: path.to_owned(),
        })
    }

    /// The next SSE frame, or `None` when the body ended.
    pub async fn next_frame(&mut self) -> Option<Result<Frame, ClientError>> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(Ok(f));
            }
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        match self.decoder.push(&data) {
                            Ok(frames) => self.ready.extend(frames),
                            Err(e) => {
                                return Some(Err(ClientError::Decode(format!(
                                    "{}: {e}",
                                    self.path.display()
                                ))))
                            }
                        }
                    }
                }
                Err(source) => {
                    return Some(Err(ClientError::Http {
                        path: self.path.clone(),
                        source,
                    }))
                }
            }
        }
    }

    /// The next engine event, or `None` when the body ended.
    pub async fn next_event(&mut self) -> Option<Result<EngineEvent, ClientError>> {
        let frame = match self.next_frame().await? {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        Some(EngineEvent::from_sse(&frame.event, &frame.data).map_err(ClientError::Decode))
    }

    /// The next event that already arrived and was decoded, without waiting for more bytes
    /// (to handle a burst of events in one go).
    pub fn next_ready_event(&mut self) -> Option<Result<EngineEvent, ClientError>> {
        let frame = self.ready.pop_front()?;
        Some(EngineEvent::from_sse(&frame.event, &frame.data).map_err(ClientError::Decode))
    }

    /// Reads the stream to its end event; an `error` event is returned as its typed body.
    pub async fn collect(mut self) -> Result<Completion, StreamFailure> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(ev) = self.next_event().await {
            match ev.map_err(StreamFailure::Client)? {
                EngineEvent::Token(t) => {
                    text.push_str(&t.t);
                    tokens.push(t.t);
                }
                EngineEvent::End(end) => return Ok(Completion { text, tokens, end }),
                EngineEvent::Error(body) => return Err(StreamFailure::Event(body)),
            }
        }
        Err(StreamFailure::Client(ClientError::Truncated))
    }
}

/// Why a stream did not end with an `end` event.
#[derive(Debug, thiserror::Error)]
pub enum StreamFailure {
    #[error(transparent)]
    Client(ClientError),
    #[error("error event: {0}")]
    Event(ErrorBody),
}
