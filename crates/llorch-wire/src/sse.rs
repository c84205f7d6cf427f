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

/// The longest SSE frame a [`Decoder`] accepts by default: far above any event llama-orch
/// sends (a token, an end event with its counts, an error with its message), far below what
/// could hurt a process.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// A peer sent a frame (or an unfinished one) longer than the decoder's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLong {
    pub limit: usize,
}

impl std::fmt::Display for FrameTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an SSE frame is longer than {} bytes", self.limit)
    }
}

impl std::error::Error for FrameTooLong {}

/// Incremental SSE decoder. Comment lines (`: keep-alive`) are skipped.
///
/// Its buffer holds at most one unfinished frame of at most `limit` bytes, and each push scans
/// only the bytes it has not scanned before: a long line arriving in small reads costs time in
/// proportion to its length, not to its length squared.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the search for the blank line that ends a frame resumes.
    scanned: usize,
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }
}

impl Decoder {
    /// A decoder that refuses frames longer than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            limit,
        }
    }

    /// Feeds bytes and returns every frame they complete; an error once a frame is longer than
    /// the limit (the stream cannot be trusted after that, and the buffer is dropped).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>, FrameTooLong> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut start = 0;
        let mut from = self.scanned;
        while let Some((end, sep)) = find_frame_end(&self.buf, from.max(start)) {
            if end - start > self.limit {
                return Err(self.too_long());
            }
            frames.extend(parse_frame(&self.buf[start..end]));
            start = end + sep;
            from = start;
        }
        self.buf.drain(..start);
        if self.buf.len() > self.limit {
            return Err(self.too_long());
        }
        // A separator may straddle this push and the next: look at the last two bytes again.
        self.scanned = self.buf.len().saturating_sub(2);
        Ok(frames)
    }

    fn too_long(&mut self) -> FrameTooLong {
        self.buf = Vec::new();
        self.scanned = 0;
        FrameTooLong { limit: self.limit }
    }
}

/// One frame's lines; `None` for a frame without data (comments only).
fn parse_frame(raw: &[u8]) -> Option<Frame> {
    let text = String::from_utf8_lossy(raw);
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
    data.map(|data| Frame {
        event: event.unwrap_or_else(|| "message".to_string()),
        data,
    })
}

/// Finds the first blank line at or after `from` that ends a frame: returns (where the frame
/// ends, separator length).
fn find_frame_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
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
            frames.extend(d.push(std::slice::from_ref(b)).unwrap());
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
        let frames = d.push(b"data: hello\r\n\r\n").unwrap();
        assert_eq!(frames[0].event, "message");
        assert_eq!(frames[0].data, "hello");
    }

    #[test]
    fn a_long_line_is_scanned_once_and_refused_past_the_limit() {
        let mut d = Decoder::with_limit(64 * 1024);
        let chunk = [b'x'; 1000];
        d.push(b"data: ").unwrap();
        for _ in 0..60 {
            assert!(d.push(&chunk).unwrap().is_empty());
            // The next push resumes where this one stopped, not at the frame's start.
            assert_eq!(d.scanned, d.buf.len() - 2);
        }
        let frames = d.push(b"\n\n").unwrap();
        assert_eq!(frames[0].data.len(), 60_000);
        assert!(d.buf.is_empty());

        // Past the limit, unfinished or whole, the frame is refused and nothing is kept.
        assert_eq!(
            d.push(&vec![b'y'; 64 * 1024 + 1]),
            Err(FrameTooLong { limit: 64 * 1024 })
        );
        assert!(d.buf.is_empty());
        let mut whole = b"data: ".to_vec();
        whole.extend(vec![b'z'; 64 * 1024]);
        whole.extend(b"\n\ndata: next\n\n");
        assert!(d.push(&whole).is_err());
        // The default limit holds far more than any event llama-orch sends.
        let mut d = Decoder::default();
        assert!(d.push(&vec![b'w'; MAX_FRAME_BYTES + 1]).is_err());
    }

    #[test]
    fn several_frames_in_one_push_and_separators_split_across_pushes() {
        let mut d = Decoder::default();
        let frames = d.push(b"data: a\n\ndata: b\n\ndata: c\n").unwrap();
        assert_eq!(frames.len(), 2);
        // "\n" + "\r" + "\n" ends a frame, arriving in three pushes.
        assert_eq!(d.push(b"\r").unwrap(), vec![]);
        let frames = d.push(b"\n").unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data, "c");
        assert!(d.buf.is_empty());
    }
}
