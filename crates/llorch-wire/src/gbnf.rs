//! Bounds on a client's GBNF grammar, checked before llama.cpp sees it.
//!
//! llama.cpp parses a grammar with recursive descent (one level of recursion per nested
//! group) and, when it builds and advances the grammar, follows rule references recursively
//! (one level per rule that starts with another rule). 20,000 nested groups fit in the 64 KiB a
//! grammar may hold and overflow a thread's stack, which aborts the whole engine. So a grammar
//! may nest groups at most [`MAX_NESTING`] deep and define at most [`MAX_RULES`] rules; the
//! engine also parses and samples on threads with room for those bounds many times over.

/// Groups (`( … )`) nested in one another, at most.
pub const MAX_NESTING: usize = 64;
/// Rule definitions (`name ::= …`) in one grammar, at most.
pub const MAX_RULES: usize = 1024;

/// Checks the nesting of groups and the number of rules, skipping string literals, character
/// classes and comments. It does not check the syntax: llama.cpp's parser does, on what is
/// left. The error says what was exceeded.
pub fn check(gbnf: &str) -> Result<(), String> {
    let bytes = gbnf.as_bytes();
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut rules = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            // A comment ends at a line break, as llama.cpp reads it (`\r` too).
            b'#' => {
                while i < bytes.len() && !matches!(bytes[i], b'\n' | b'\r') {
                    i += 1;
                }
            }
            quote @ (b'"' | b'[') => {
                let close = if quote == b'"' { b'"' } else { b']' };
                i += 1;
                while i < bytes.len() && bytes[i] != close {
                    // An escape takes the next byte with it (`\"`, `\]`, `\\`).
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'(' => {
                depth += 1;
                deepest = deepest.max(depth);
                if depth > MAX_NESTING {
                    return Err(format!(
                        "grammar nests groups more than {MAX_NESTING} deep; flatten it into rules"
                    ));
                }
            }
            b')' => depth = depth.saturating_sub(1),
            b':' if bytes[i..].starts_with(b"::=") => {
                rules += 1;
                if rules > MAX_RULES {
                    return Err(format!(
                        "grammar defines more than {MAX_RULES} rules; simplify it"
                    ));
                }
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_and_rules_are_bounded() {
        check("root ::= (\"a\" | (\"b\" [()] )) # ((((\n").unwrap();
        check(r#"root ::= "(((\"(((" [\]((((]"#).unwrap();
        let deep = format!("root ::= {}\"x\"{}", "(".repeat(65), ")".repeat(65));
        assert!(check(&deep).unwrap_err().contains("nests"));
        let ok = format!("root ::= {}\"x\"{}", "(".repeat(64), ")".repeat(64));
        check(&ok).unwrap();
        let attack = format!("root ::= {}", "(".repeat(20_000));
        assert!(check(&attack).is_err());
        // A carriage return ends a comment: what follows is grammar, and counts.
        let hidden = format!(
            "root ::= \"a\" #\rx ::= {}\"b\"{}",
            "(".repeat(65),
            ")".repeat(65)
        );
        assert!(check(&hidden).is_err());
        let chain: String = (0..1025)
            .map(|i| format!("r{i} ::= r{}\n", i + 1))
            .collect();
        assert!(check(&chain).unwrap_err().contains("rules"));
    }

    proptest::proptest! {
        /// Any text: an answer, never a panic (unterminated strings and escapes at the end
        /// included).
        #[test]
        fn any_text_is_checked(text in "[\\(\\)\\[\\]\"\\\\#:=a \n]{0,300}") {
            let _ = check(&text);
        }
    }
}
