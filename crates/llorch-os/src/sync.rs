//! The workspace's lock policy: shared state sits behind short synchronous locks (never held
//! across an `.await`), taken through these helpers, which take the lock whatever its poison
//! flag says.
//!
//! Everything a client, a node, an engine or a file sends is validated before it reaches such a
//! lock, so no input can panic while one is held. Should a bug panic there anyway, that panic
//! ends one task or thread (the profiles build with `panic = "unwind"`), and std's poisoning
//! would then turn every later caller into a panic too: one bad request would take the whole
//! daemon down. Each critical section leaves its state usable at every step (counters, maps,
//! queues, slot tables), so serving on is better than refusing everyone. `.lock().expect()` is
//! not used on shared state.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, poisoned or not.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, poisoned or not.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_under_the_lock_does_not_lock_out_the_next_caller() {
        let m = std::sync::Arc::new(Mutex::new(1u32));
        let m2 = m.clone();
        let panicked = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("a bug under the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);

        let l = std::sync::Arc::new(RwLock::new(1u32));
        let l2 = l.clone();
        let _ = std::thread::spawn(move || {
            let _g = write(&l2);
            panic!("a bug under the write lock");
        })
        .join();
        assert!(l.is_poisoned());
        *write(&l) += 1;
        assert_eq!(*read(&l), 2);
    }
}
