//! The domain's small vocabularies: which front a request came through ([`Api`]), how a request
//! ended ([`Outcome`]), why admission refused or dropped a task ([`Rejection`]), why a task was
//! cancelled ([`CancelReason`]) and what the dispatcher did with it ([`Decision`]).
//!
//! They sit below both [`crate::tasks`] and [`crate::metrics`] (each counter's labels are
//! their `as_str` values), so neither depends on the other for them.

use llorch_wire::ErrorCode;

/// Which front end a generation request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OpenAiResponses,
    OpenAiEmbeddings,
    AnthropicMessages,
    Ollama,
    Native,
}

impl Api {
    pub const ALL: [Api; 7] = [
        Api::OpenAiChat,
        Api::OpenAiCompletions,
        Api::OpenAiResponses,
        Api::OpenAiEmbeddings,
        Api::AnthropicMessages,
        Api::Ollama,
        Api::Native,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiCompletions => "openai_completions",
            Self::OpenAiResponses => "openai_responses",
            Self::OpenAiEmbeddings => "openai_embeddings",
            Self::AnthropicMessages => "anthropic_messages",
            Self::Ollama => "ollama",
            Self::Native => "native",
        }
    }
}

/// How a generation request ended (`llorch_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Canceled,
    Failed,
    Rejected,
    Invalid,
    Unauthorized,
    Unavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::Canceled,
        Outcome::Failed,
        Outcome::Rejected,
        Outcome::Invalid,
        Outcome::Unauthorized,
        Outcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Canceled => "canceled",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Invalid => "invalid",
            Self::Unauthorized => "unauthorized",
            Self::Unavailable => "unavailable",
        }
    }

    /// The outcome of a request refused before admission, from its status.
    pub fn of_refusal(status: hyper::StatusCode) -> Self {
        match status.as_u16() {
            400 | 404 | 409 | 413 | 422 => Self::Invalid,
            401 | 403 => Self::Unauthorized,
            429 => Self::Rejected,
            503 => Self::Unavailable,
            _ => Self::Failed,
        }
    }

    /// The outcome of an admitted task that ended with an error event. A request the engine
    /// refused as invalid (its chat template refuses the messages, a grammar does not parse, a
    /// model without tool support asked to choose a tool) is the client's, like a 400 at the
    /// door.
    pub fn of_error(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Canceled => Self::Canceled,
            ErrorCode::InvalidParams => Self::Invalid,
            ErrorCode::AdmissionReject | ErrorCode::QueueFullDropLru | ErrorCode::DeadlineUnmet => {
                Self::Rejected
            }
            _ => Self::Failed,
        }
    }
}

/// Why admission refused or dropped a task (`llorch_admission_rejections_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull,
    Deadline,
    Evicted,
    Expired,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::QueueFull,
        Rejection::Deadline,
        Rejection::Evicted,
        Rejection::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Deadline => "deadline",
            Self::Evicted => "evicted",
            Self::Expired => "expired",
        }
    }
}

/// Why a task was cancelled (`llorch_tasks_canceled_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// `POST /v2/tasks/{id}/cancel`.
    Client,
    /// The OpenAI client closed its connection.
    Disconnect,
    /// orchestratord stopped while the task waited.
    Shutdown,
    /// An operator cancelled it (D-Bus `CancelTask`).
    Operator,
}

impl CancelReason {
    pub const ALL: [CancelReason; 4] = [
        CancelReason::Client,
        CancelReason::Disconnect,
        CancelReason::Shutdown,
        CancelReason::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Disconnect => "disconnect",
            Self::Shutdown => "shutdown",
            Self::Operator => "operator",
        }
    }
}

/// What the dispatcher did with a task (`llorch_placement_decisions_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Placed,
    Requeued,
    Impossible,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Placed, Decision::Requeued, Decision::Impossible];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Requeued => "requeued",
            Self::Impossible => "impossible",
        }
    }
}
