//! Commands to a pool's supervisor: what they are, the request that carries one with its
//! answer, and [`ask`], which hands one over and waits for it to be carried out (operator
//! actions in `control.rs`, unloads to make room in `swap.rs`).

/// An operator's command to a pool's supervisor (D-Bus `Load`, `Unload`, `Restart`). It is
/// declared below the table that holds each supervisor's command channel
/// ([`crate::state::PoolEntry::commands`]), so the table does not depend on the supervisor that
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Load the model now: an on-demand pool on standby starts its engine (which unloads again
    /// after its keep-alive without work); a failed pool retries at once; otherwise nothing.
    Load,
    /// Stop an on-demand pool's engine and go back to standby (its socket keeps listening).
    Unload,
    /// Stop the engine if one runs and start it again (an on-demand pool ends up loaded); a
    /// failed pool retries at once.
    Restart,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "Load",
            Self::Unload => "Unload",
            Self::Restart => "Restart",
        }
    }
}

/// A command with whom it came from and where the answer goes (sent once it was carried out:
/// after the engine stopped, for `Unload` and `Restart`).
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub by: String,
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Why a command handed to a pool's supervisor was not carried out.
#[derive(Debug)]
pub enum Unanswered {
    /// No supervisor runs for the pool now (starting, or the pool was removed or stops).
    NoSupervisor,
    /// Not taken or not answered within the limit.
    TimedOut,
    /// The supervisor refused it, saying why.
    Refused(String),
}

/// Hands `command` to the supervisor behind `sender` and waits until it was carried out, each
/// step (the send, the answer) at most `limit`.
pub async fn ask(
    sender: tokio::sync::mpsc::Sender<Request>,
    command: Command,
    by: &str,
    limit: std::time::Duration,
) -> Result<(), Unanswered> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = Request {
        command,
        by: by.to_string(),
        reply,
    };
    // A supervisor that stopped (pool removed, node stopping) has dropped its receiver.
    match tokio::time::timeout(limit, sender.send(request)).await {
        Err(_) => return Err(Unanswered::TimedOut),
        Ok(Err(_)) => return Err(Unanswered::NoSupervisor),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(limit, answer).await {
        Err(_) => Err(Unanswered::TimedOut),
        Ok(Err(_)) => Err(Unanswered::NoSupervisor),
        Ok(Ok(Err(why))) => Err(Unanswered::Refused(why)),
        Ok(Ok(Ok(()))) => Ok(()),
    }
}
