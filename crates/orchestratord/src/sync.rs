//! Locks that outlive a panic.
//!
//! orchestratord's shared state sits behind short synchronous locks. Everything a client or a
//! node sends is validated before it reaches them, so no input can panic while one is held;
//! should a bug panic there anyway, that panic ends one request's task (the process keeps
//! running: the profiles build with `panic = "unwind"`), and std's lock poisoning would then
//! turn every later request into a panic too. These helpers take the lock whatever its poison
//! flag says: each critical section leaves the state usable at every step (counters, maps,
//! queues), so serving on is better than refusing everyone.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

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
    }
}
