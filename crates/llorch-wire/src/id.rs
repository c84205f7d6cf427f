//! The one definition of a valid id, shared by every role that reads one from a file or the
//! network: node and pool ids appear in paths (URLs, handoff files, unit names), model ids in
//! cache folder names, so neither may hold a separator, a space or a control character.

/// The longest node or pool id.
pub const MAX_ID_LEN: usize = 64;
/// The longest model id.
pub const MAX_MODEL_ID_LEN: usize = 128;

/// A node or pool id: 1 to 64 of `A-Z a-z 0-9 _ . -`, and not `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A model id: 1 to 128 of `A-Z a-z 0-9 _ . - :`, not starting with `.`.
pub fn valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MODEL_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// A random 64-bit number from the operating system's CSPRNG (ring's `SystemRandom`, already
/// here for the beats' HMAC), for ids a client or a node must not be able to guess: task ids,
/// beat sessions, tool call ids.
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // getrandom(2) fails only where the kernel has no such call (before Linux 3.17) or a
    // seccomp filter forbids it; no id is better than a guessable one.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source (getrandom) is available");
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_differ() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| random_u64()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn ids_are_path_safe() {
        for good in ["home", "gpu-0", "a.b_c", &"x".repeat(MAX_ID_LEN)] {
            assert!(valid_id(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a/b",
            "a:b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
        assert!(valid_model_id("qwen2.5:7b"));
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            &"m".repeat(MAX_MODEL_ID_LEN + 1),
        ] {
            assert!(!valid_model_id(bad), "{bad}");
        }
    }
}
