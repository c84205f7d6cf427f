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

/// A random 64-bit number, for ids. Every `RandomState` has fresh random keys; hashing a
/// counter under it gives a random number without another dependency.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

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
