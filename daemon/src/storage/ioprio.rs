//! Raising the I/O priority of the few small synchronous writes the control path makes (a
//! manifest's fsync), so they do not queue behind a client's bulk writeback in the block
//! layer's scheduler. Effective where the disk's scheduler honours priorities (mq-deadline,
//! bfq); harmless elsewhere.

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_CLASS_RT: libc::c_int = 1;
const IOPRIO_CLASS_BE: libc::c_int = 2;

fn prio(class: libc::c_int, level: libc::c_int) -> libc::c_int {
    (class << IOPRIO_CLASS_SHIFT) | level
}

fn get() -> Option<libc::c_int> {
    // SAFETY: ioprio_get takes two integers and returns one; it touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0) };
    (rc >= 0).then_some(rc as libc::c_int)
}

fn set(value: libc::c_int) -> bool {
    // SAFETY: ioprio_set takes three integers (0 = the calling thread); no memory is shared.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, value) == 0 }
}

/// Runs `f` with the calling thread's I/O priority raised (real-time class where allowed, the
/// highest best-effort level otherwise), then restores it.
pub fn urgent<T>(f: impl FnOnce() -> T) -> T {
    let previous = get();
    let raised = set(prio(IOPRIO_CLASS_RT, 0)) || set(prio(IOPRIO_CLASS_BE, 0));
    let out = f();
    if raised {
        if let Some(previous) = previous {
            set(previous);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_restored_after_the_call() {
        let before = get();
        let inside = urgent(get);
        assert_eq!(get(), before);
        // Either class was accepted, or nothing changed (no permission and no effect).
        assert!(inside.is_some());
    }
}
