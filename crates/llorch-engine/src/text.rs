//! Turning token bytes into the text a client sees: never split a UTF-8 character, and never
//! leak a stop string. Pure code, unit-tested on its own.

/// Accumulates token bytes and releases text in whole UTF-8 characters, holding back anything
/// that could still become (part of) a stop string.
#[derive(Debug)]
pub struct TextStream {
    /// Bytes not yet valid UTF-8 (an incomplete character at the end).
    bytes: Vec<u8>,
    /// Decoded text not yet released, because it may be the start of a stop string.
    held: String,
    stops: Vec<String>,
}

/// What a push produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Text safe to send (may be empty).
    Text(String),
    /// A stop string matched: the text before it, and the stop string. Generation ends.
    Stopped(String, String),
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            bytes: Vec::new(),
            held: String::new(),
            stops,
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, piece: &[u8]) -> Output {
        self.bytes.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Bytes that can never become valid UTF-8: replace them so the stream goes on.
            Err(_) => {
                let lossy = String::from_utf8_lossy(&self.bytes).into_owned();
                self.bytes.clear();
                self.held.push_str(&lossy);
                return self.release();
            }
        };
        let complete: Vec<u8> = self.bytes.drain(..valid).collect();
        self.held
            .push_str(std::str::from_utf8(&complete).expect("checked above"));
        self.release()
    }

    fn release(&mut self) -> Output {
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at)
        {
            let (before, stop) = (self.held[..at].to_string(), stop.clone());
            self.held.clear();
            return Output::Stopped(before, stop);
        }
        // Keep the longest suffix of `held` that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Output::Text(out)
    }

    /// Releases what is held at the end of generation (no stop string can match any more).
    /// Incomplete UTF-8 left over is dropped; it can never become a character.
    pub fn finish(&mut self) -> String {
        self.bytes.clear();
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on character
/// boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match s.push(p) {
                Output::Text(t) => out.push_str(&t),
                Output::Stopped(t, _) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn multibyte_characters_split_across_tokens_are_sent_whole() {
        let euro = "€".as_bytes(); // three bytes
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.push(&euro[..1]), Output::Text(String::new()));
        assert_eq!(s.push(&euro[1..2]), Output::Text(String::new()));
        assert_eq!(s.push(&euro[2..]), Output::Text("€".into()));
        let (text, _) = run(
            &[],
            &[b"a", &"é".as_bytes()[..1], &"é".as_bytes()[1..], b"b"],
        );
        assert_eq!(text, "aéb");
    }

    #[test]
    fn stop_strings_split_across_tokens_are_never_sent() {
        let (text, stopped) = run(&["</end>"], &[b"hello <", b"/en", b"d> more"]);
        assert_eq!(text, "hello ");
        assert!(stopped);
        // A near miss is released once it can no longer match.
        let (text, stopped) = run(&["</end>"], &[b"a </e", b"x>"]);
        assert_eq!(text, "a </ex>");
        assert!(!stopped);
        // The earliest of several stop strings wins, and is named.
        let (text, _) = run(&["cd", "b"], &[b"abcd"]);
        assert_eq!(text, "a");
        let mut s = TextStream::new(vec!["cd".into(), "b".into()]);
        assert_eq!(s.push(b"abcd"), Output::Stopped("a".into(), "b".into()));
    }

    #[test]
    fn held_back_prefix_is_released_at_the_end() {
        let (text, stopped) = run(&["STOP"], &[b"go ST"]);
        assert_eq!(text, "go ST");
        assert!(!stopped);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let (text, _) = run(&[], &[b"a", &[0xff], b"b"]);
        assert_eq!(text, "a\u{fffd}b");
    }
}
