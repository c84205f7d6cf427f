//! Streams an answer from an engine socket to a writer, as it is generated.

use std::io::Write;
use std::path::Path;

use llorch_client::UnixClient;
use llorch_wire::engine::{EndEvent, EngineEvent, GenerateRequest};

/// Sends `req` to the engine at `socket` and writes each piece of text as it arrives.
pub async fn stream_to(
    socket: &Path,
    req: &GenerateRequest,
    out: &mut dyn Write,
) -> anyhow::Result<EndEvent> {
    let client = UnixClient::new(socket);
    let mut stream = client.generate(req).await?;
    while let Some(ev) = stream.next_event().await {
        match ev? {
            EngineEvent::Token(t) => {
                out.write_all(t.t.as_bytes())?;
                out.flush()?;
            }
            EngineEvent::End(end) => return Ok(end),
            EngineEvent::Error(e) => anyhow::bail!("the engine ended the stream: {e}"),
        }
    }
    anyhow::bail!("the engine closed the stream without an end event")
}
