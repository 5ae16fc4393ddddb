//! Threads started from a PostgreSQL process (tokio's) must never run its signal handlers:
//! Postgres' handlers set flags and latches meant for the main thread, and pgrx refuses any
//! Postgres call from another thread. A new thread inherits the signal mask of the thread that
//! starts it, so code that may start threads runs with every signal blocked; signals that
//! arrive meanwhile stay pending and are handled on the main thread once its mask is restored.

/// Run `f` with every signal blocked on this thread, then restore the mask (also when `f`
/// panics).
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the mask saved below; only this thread's mask changes.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }
    // SAFETY: sigfillset/pthread_sigmask only manipulate this thread's signal mask; the old
    // mask is restored when `_restore` drops.
    let _restore = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        Restore(old)
    };
    f()
}
