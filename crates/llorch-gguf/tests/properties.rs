//! Property tests of the GGUF reader, which parses files from anywhere (a URL, an upload):
//! whatever the bytes, it never panics, never allocates out of proportion to the file (a
//! 100-byte file claiming 2^40 array elements must not ask for terabytes), and a truncated
//! valid file is an error, never a success.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;

use llorch_gguf::inspect_reader;
use llorch_gguf::write::TestModel;
use proptest::prelude::*;

/// Tracks the largest single allocation of the current thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the thread-local is
// const-initialized, so recording a size allocates nothing and cannot recurse.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs the reader on `bytes` and returns whether it read a whole file, and the largest
/// allocation it made.
fn inspect_bounded(bytes: &[u8]) -> (bool, usize) {
    LARGEST.with(|l| l.set(0));
    let ok = inspect_reader(Cursor::new(bytes), bytes.len() as u64).is_ok();
    (ok, LARGEST.with(Cell::get))
}

/// What a file of `len` bytes may cost: each value the file holds is at most a small
/// constant factor larger in memory than on disk, plus the reader's fixed overhead.
fn budget(len: usize) -> usize {
    64 * len + (64 << 10)
}

fn valid() -> Vec<u8> {
    TestModel::default().to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(2000), ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_read_without_panic_or_a_huge_allocation(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        let (_, largest) = inspect_bounded(&bytes);
        prop_assert!(largest <= budget(bytes.len()), "{largest} bytes for a {}-byte file", bytes.len());
    }

    #[test]
    fn a_valid_header_with_any_bytes_after_it(
        tail in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        // A real magic and version, then anything: every count and length is the attacker's.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&tail);
        let (_, largest) = inspect_bounded(&bytes);
        prop_assert!(largest <= budget(bytes.len()), "{largest} bytes for a {}-byte file", bytes.len());
    }

    #[test]
    fn a_valid_file_with_bytes_changed(
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let mut bytes = valid();
        for (at, b) in changes {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let (_, largest) = inspect_bounded(&bytes);
        prop_assert!(largest <= budget(bytes.len()));
    }

    #[test]
    fn a_truncated_valid_file_is_an_error(at in any::<prop::sample::Index>()) {
        let bytes = valid();
        let cut = at.index(bytes.len());
        let (ok, _) = inspect_bounded(&bytes[..cut]);
        prop_assert!(!ok, "a file cut at {cut} of {} bytes was read as whole", bytes.len());
    }

    /// The fuzz corpus's samples (`fuzz/corpus/gguf/`: the first 64 KiB of the default model, a
    /// header cut short), mutated: never a panic, never an allocation out of proportion.
    #[test]
    fn mutated_corpus_headers_stay_bounded(
        pick in any::<prop::sample::Index>(),
        sets in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/gguf");
        let mut samples: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        samples.sort();
        let mut bytes = std::fs::read(&samples[pick.index(samples.len())]).unwrap();
        for (i, b) in &sets {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let (_, largest) = inspect_bounded(&bytes);
        prop_assert!(largest <= budget(bytes.len()), "{largest} bytes for a {}-byte file", bytes.len());
    }
}

#[test]
fn a_tiny_file_claiming_a_huge_array_is_refused_cheaply() {
    // One metadata entry: an array of 2^40 u8 values, in a file of a few dozen bytes.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&3u64.to_le_bytes());
    bytes.extend_from_slice(b"key");
    bytes.extend_from_slice(&9u32.to_le_bytes()); // array
    bytes.extend_from_slice(&0u32.to_le_bytes()); // of u8
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let (ok, largest) = inspect_bounded(&bytes);
    assert!(!ok);
    assert!(largest <= budget(bytes.len()), "{largest}");
    assert!(inspect_bounded(&valid()).0, "the valid file reads");
}
