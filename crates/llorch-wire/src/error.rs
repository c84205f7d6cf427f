//! Typed errors: the codes every role uses and the JSON body that carries them.

use serde::{Deserialize, Serialize};

/// Error codes shared by the native API, the node API and the engine.
///
/// The names carry over from the original llama-orch design so existing clients keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    AdmissionReject,
    QueueFullDropLru,
    InvalidParams,
    ModelNotFound,
    PoolUnready,
    PoolUnavailable,
    NodeUnavailable,
    DeadlineUnmet,
    EngineFailed,
    Canceled,
    Unauthorized,
    /// The credential is valid but does not allow this: a client key without the admin mark
    /// on an operator endpoint, a node token used for another node id.
    Forbidden,
    /// A limit on concurrent use was reached (stream subscribers of one task or one client):
    /// retry when one ends.
    RateLimited,
    /// A stream's reader fell so far behind the task that the events it had not read were
    /// dropped from the task's bounded log; the stream ends, the task goes on.
    SlowReader,
    /// The model cannot be loaded: the node's memory is held by pools that are not unloaded
    /// to make room (pinned, always loaded), or the model is larger than the whole budget.
    /// The message names them.
    InsufficientMemory,
    Internal,
}

impl ErrorCode {
    /// Whether a client may retry the same request later and expect it to succeed.
    pub fn retriable(self) -> bool {
        matches!(
            self,
            Self::AdmissionReject
                | Self::RateLimited
                | Self::QueueFullDropLru
                | Self::PoolUnready
                | Self::PoolUnavailable
                | Self::NodeUnavailable
                | Self::EngineFailed
        )
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdmissionReject => "ADMISSION_REJECT",
            Self::QueueFullDropLru => "QUEUE_FULL_DROP_LRU",
            Self::InvalidParams => "INVALID_PARAMS",
            Self::ModelNotFound => "MODEL_NOT_FOUND",
            Self::PoolUnready => "POOL_UNREADY",
            Self::PoolUnavailable => "POOL_UNAVAILABLE",
            Self::NodeUnavailable => "NODE_UNAVAILABLE",
            Self::DeadlineUnmet => "DEADLINE_UNMET",
            Self::EngineFailed => "ENGINE_FAILED",
            Self::Canceled => "CANCELED",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Forbidden => "FORBIDDEN",
            Self::RateLimited => "RATE_LIMITED",
            Self::SlowReader => "SLOW_READER",
            Self::InsufficientMemory => "INSUFFICIENT_MEMORY",
            Self::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The native error body: an HTTP error answer before a stream starts, and the payload of the
/// `error` SSE event after it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// A sentence for people: what happened, which input caused it, what to do.
    pub message: String,
    pub retriable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_label: Option<String>,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retriable: code.retriable(),
            retry_after_ms: None,
            policy_label: None,
            field: None,
        }
    }

    /// An `INVALID_PARAMS` error that names the field at fault.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut body = Self::new(ErrorCode::InvalidParams, message);
        body.field = Some(field.into());
        body
    }

    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_the_original_names() {
        let body = ErrorBody::invalid("max_tokens", "max_tokens must be at least 1");
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["code"], "INVALID_PARAMS");
        assert_eq!(json["field"], "max_tokens");
        assert_eq!(json["retriable"], false);
        assert!(json.get("retry_after_ms").is_none());
        let back: ErrorBody = serde_json::from_value(json).unwrap();
        assert_eq!(back, body);
        assert_eq!(
            serde_json::to_string(&ErrorCode::QueueFullDropLru).unwrap(),
            format!("\"{}\"", ErrorCode::QueueFullDropLru.as_str())
        );
    }
}
