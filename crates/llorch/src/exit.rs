//! The exit code of a failed `llorch` command, from what failed (the shared codes of
//! [`llorch_wire::exit`]), so a script can tell "the server is down" from "my key was refused"
//! from "the queue is full, try later" without parsing the message.

use hyper::StatusCode;
use llorch_client::{ClientError, StreamFailure};
use llorch_wire::exit;

/// The exit code for `error`: the first cause in its chain that a code names, else
/// [`exit::FAILURE`].
pub fn code(error: &anyhow::Error) -> i32 {
    error
        .chain()
        .find_map(|cause| {
            if let Some(e) = cause.downcast_ref::<ClientError>() {
                Some(client_code(e))
            } else if let Some(StreamFailure::Client(e)) = cause.downcast_ref::<StreamFailure>() {
                Some(client_code(e))
            } else {
                None
            }
        })
        .unwrap_or(exit::FAILURE)
}

fn client_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { .. } | ClientError::Unreachable { .. } => exit::UNAVAILABLE,
        ClientError::Address(_) | ClientError::Tls { .. } | ClientError::Request { .. } => {
            exit::USAGE
        }
        ClientError::Http { .. }
        | ClientError::Transport { .. }
        | ClientError::Decode(_)
        | ClientError::Truncated => exit::PROTOCOL,
        ClientError::Status { status, .. } => status_code(*status),
    }
}

fn status_code(status: StatusCode) -> i32 {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => exit::NOPERM,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => exit::TEMPFAIL,
        s if s.is_client_error() => exit::DATAERR,
        _ => exit::UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: StatusCode) -> anyhow::Error {
        ClientError::Status {
            status,
            body: None,
            raw: String::new(),
            retry_after: None,
        }
        .into()
    }

    #[test]
    fn each_kind_of_failure_has_its_code() {
        let unreachable = ClientError::Unreachable {
            address: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(code(&unreachable.into()), exit::UNAVAILABLE);
        assert_eq!(code(&ClientError::Address("x".into()).into()), exit::USAGE);
        assert_eq!(code(&status(StatusCode::UNAUTHORIZED)), exit::NOPERM);
        assert_eq!(code(&status(StatusCode::TOO_MANY_REQUESTS)), exit::TEMPFAIL);
        assert_eq!(code(&status(StatusCode::NOT_FOUND)), exit::DATAERR);
        assert_eq!(code(&status(StatusCode::BAD_GATEWAY)), exit::UNAVAILABLE);
        let truncated = StreamFailure::Client(ClientError::Truncated);
        assert_eq!(code(&truncated.into()), exit::PROTOCOL);
        let context = anyhow::Error::from(ClientError::Address("x".into())).context("status");
        assert_eq!(code(&context), exit::USAGE, "a cause under context counts");
        assert_eq!(code(&anyhow::anyhow!("drain timed out")), exit::FAILURE);
    }
}
