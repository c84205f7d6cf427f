//! Server-sent events framing: encoding one frame, and an incremental decoder that accepts
//! arbitrary byte chunks (a frame may arrive split across reads).

/// Encodes one SSE frame. Multi-line data is split into several `data:` lines, as the SSE
/// specification requires; JSON payloads never contain raw newlines.
pub fn frame(event: &str, data: &str) -> String {
    let mut out = String::with_capacity(event.len() + data.len() + 16);
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// One decoded SSE frame. `event` is `message` when the frame had no `event:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub event: String,
    pub data: String,
}

/// Incremental SSE decoder. Comment lines (`: keep-alive`) are skipped.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Feeds bytes and returns every frame they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some(end) = find_frame_end(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end.0 + end.1).collect();
            let text = String::from_utf8_lossy(&raw[..end.0]);
            let mut event = None;
            let mut data: Option<String> = None;
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "event" => event = Some(value.to_string()),
                    "data" => match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(value);
                        }
                        None => data = Some(value.to_string()),
                    },
                    _ => {}
                }
            }
            if let Some(data) = data {
                frames.push(Frame {
                    event: event.unwrap_or_else(|| "message".to_string()),
                    data,
                });
            }
        }
        frames
    }
}

/// Finds the blank line that ends a frame: returns (frame length, separator length).
fn find_frame_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let wire = format!(
            "{}: keep-alive\n\n{}",
            frame("token", r#"{"t":"a","i":0}"#),
            frame("end", "x\ny")
        );
        let mut d = Decoder::default();
        let mut frames = Vec::new();
        for b in wire.as_bytes() {
            frames.extend(d.push(std::slice::from_ref(b)));
        }
        assert_eq!(
            frames,
            vec![
                Frame {
                    event: "token".into(),
                    data: r#"{"t":"a","i":0}"#.into()
                },
                Frame {
                    event: "end".into(),
                    data: "x\ny".into()
                }
            ]
        );
    }

    #[test]
    fn decodes_crlf_and_default_event_names() {
        let mut d = Decoder::default();
        let frames = d.push(b"data: hello\r\n\r\n");
        assert_eq!(frames[0].event, "message");
        assert_eq!(frames[0].data, "hello");
    }
}
