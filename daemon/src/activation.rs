//! Socket activation: listening sockets systemd (or `systemd-socket-activate`) bound for us and
//! passed as named file descriptors (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES). `nbd` fds become
//! NBD listeners, TCP or Unix by their address family; `admin` becomes the admin socket.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// FileDescriptorName= of the sockets that carry NBD.
pub const NBD: &str = "nbd";
/// FileDescriptorName= of the admin socket.
pub const ADMIN: &str = "admin";

/// Set once the inherited fds are wrapped, so no second `take` can own them twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("reading the inherited sockets from LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES: {0}")]
    Environment(#[source] io::Error),
    #[error("inherited fd {fd} named {name:?}: {what} failed: {source}")]
    Inspect {
        fd: RawFd,
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("inherited fd {fd} has name {name:?}; evsd uses FileDescriptorName={NBD} or {ADMIN}")]
    UnknownName { fd: RawFd, name: String },
    #[error("inherited fd {fd} named {name:?} is not a listening stream socket")]
    NotListening { fd: RawFd, name: String },
    #[error(
        "inherited fd {fd} named {name:?} has address family {family}; expected AF_INET, AF_INET6 or AF_UNIX"
    )]
    Family {
        fd: RawFd,
        name: String,
        family: libc::c_int,
    },
    #[error("inherited admin fd {fd} is not a Unix socket")]
    AdminNotUnix { fd: RawFd },
    #[error("inherited Unix socket fd {fd} named {name:?} has no path (abstract and unnamed sockets are not supported)")]
    NoPath { fd: RawFd, name: String },
    #[error(
        "two inherited {kind} sockets (fds {first} and {second}); evsd serves one of each kind"
    )]
    Duplicate {
        kind: &'static str,
        first: RawFd,
        second: RawFd,
    },
}

/// A Unix listener passed to us and the path systemd bound it at.
pub struct InheritedUnix {
    pub listener: UnixListener,
    pub path: PathBuf,
}

/// The listeners the service manager passed; all empty when evsd was started directly.
#[derive(Default)]
pub struct Inherited {
    pub nbd_tcp: Option<TcpListener>,
    pub nbd_unix: Option<InheritedUnix>,
    pub admin: Option<InheritedUnix>,
}

impl Inherited {
    /// Whether NBD listeners were passed: then evsd binds none of its own.
    pub fn has_nbd(&self) -> bool {
        self.nbd_tcp.is_some() || self.nbd_unix.is_some()
    }

    /// Takes the fds passed for this process (none when LISTEN_PID names another one). They
    /// come back non-blocking, as tokio needs, and close-on-exec.
    pub fn take() -> Result<Inherited, ActivationError> {
        let mut inherited = Inherited::default();
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(inherited);
        }
        // listen_fds_with_names sets FD_CLOEXEC on each fd before returning it.
        let fds = sd_notify::listen_fds_with_names().map_err(ActivationError::Environment)?;
        for (raw, name) in fds {
            // SAFETY: LISTEN_FDS/LISTEN_PID say the service manager opened these fds for this
            // very process; nothing else in evsd uses them and TAKEN makes this the only place
            // that wraps them, so each gets exactly one owner.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            inherited.add(fd, name)?;
        }
        Ok(inherited)
    }

    fn add(&mut self, fd: OwnedFd, name: String) -> Result<(), ActivationError> {
        let raw = fd.as_raw_fd();
        let inspect = |what, source| ActivationError::Inspect {
            fd: raw,
            name: name.clone(),
            what,
            source,
        };
        if name != NBD && name != ADMIN {
            return Err(ActivationError::UnknownName {
                fd: raw,
                name: name.clone(),
            });
        }
        if !is_listening(fd.as_fd()).map_err(|e| inspect("getsockopt(SO_ACCEPTCONN)", e))? {
            return Err(ActivationError::NotListening {
                fd: raw,
                name: name.clone(),
            });
        }
        let family = family(fd.as_fd()).map_err(|e| inspect("getsockname", e))?;
        match family {
            libc::AF_INET | libc::AF_INET6 => {
                if name == ADMIN {
                    return Err(ActivationError::AdminNotUnix { fd: raw });
                }
                let listener = TcpListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .map_err(|e| inspect("set_nonblocking", e))?;
                put(&mut self.nbd_tcp, listener, "TCP nbd", raw, |l| {
                    l.as_raw_fd()
                })
            }
            libc::AF_UNIX => {
                let listener = UnixListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .map_err(|e| inspect("set_nonblocking", e))?;
                let address = listener
                    .local_addr()
                    .map_err(|e| inspect("getsockname", e))?;
                let Some(path) = address.as_pathname().map(PathBuf::from) else {
                    return Err(ActivationError::NoPath {
                        fd: raw,
                        name: name.clone(),
                    });
                };
                let (slot, kind) = if name == ADMIN {
                    (&mut self.admin, "admin")
                } else {
                    (&mut self.nbd_unix, "Unix nbd")
                };
                put(slot, InheritedUnix { listener, path }, kind, raw, |u| {
                    u.listener.as_raw_fd()
                })
            }
            other => Err(ActivationError::Family {
                fd: raw,
                name: name.clone(),
                family: other,
            }),
        }
    }
}

fn put<T>(
    slot: &mut Option<T>,
    value: T,
    kind: &'static str,
    fd: RawFd,
    fd_of: impl Fn(&T) -> RawFd,
) -> Result<(), ActivationError> {
    if let Some(first) = slot {
        return Err(ActivationError::Duplicate {
            kind,
            first: fd_of(first),
            second: fd,
        });
    }
    *slot = Some(value);
    Ok(())
}

fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` is a writable c_int and `len` its size, which is what SO_ACCEPTCONN
    // stores; the fd is open for the borrow's lifetime.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value != 0)
}

fn family(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is writable and `len` bytes long, large enough for any family's
    // address (getsockname truncates otherwise); the fd is open for the borrow's lifetime.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(storage.ss_family))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_tcp_and_unix_listeners_by_family_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let nbd_path = dir.path().join("nbd.sock");
        let admin_path = dir.path().join("admin.sock");
        let mut inherited = Inherited::default();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        inherited.add(OwnedFd::from(tcp), NBD.into()).unwrap();
        let unix = UnixListener::bind(&nbd_path).unwrap();
        inherited.add(OwnedFd::from(unix), NBD.into()).unwrap();
        let admin = UnixListener::bind(&admin_path).unwrap();
        inherited.add(OwnedFd::from(admin), ADMIN.into()).unwrap();

        assert!(inherited.has_nbd());
        let got_tcp = inherited.nbd_tcp.as_ref().unwrap().local_addr().unwrap();
        assert_eq!(got_tcp, tcp_addr);
        assert_eq!(inherited.nbd_unix.as_ref().unwrap().path, nbd_path);
        assert_eq!(inherited.admin.as_ref().unwrap().path, admin_path);
    }

    #[test]
    fn rejects_unknown_names_duplicates_and_tcp_admin() {
        let mut inherited = Inherited::default();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = inherited
            .add(OwnedFd::from(tcp), "evsd.socket".into())
            .unwrap_err();
        assert!(err.to_string().contains("\"evsd.socket\""), "{err}");

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = inherited.add(OwnedFd::from(tcp), ADMIN.into()).unwrap_err();
        assert!(matches!(err, ActivationError::AdminNotUnix { .. }), "{err}");

        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        inherited.add(OwnedFd::from(first), NBD.into()).unwrap();
        let second = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = inherited
            .add(OwnedFd::from(second), NBD.into())
            .unwrap_err();
        assert!(matches!(err, ActivationError::Duplicate { .. }), "{err}");
    }

    #[test]
    fn rejects_a_socket_that_is_not_listening() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Inherited::default()
            .add(OwnedFd::from(socket), NBD.into())
            .unwrap_err();
        assert!(matches!(err, ActivationError::NotListening { .. }), "{err}");
    }
}
