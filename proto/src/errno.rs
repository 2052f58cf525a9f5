//! The error numbers NBD carries on the wire. They are the spec's own values, not the host's.

/// An error a request can be answered with. The set is closed: the spec tells clients to treat
/// anything else as `EINVAL`, so the daemon maps every failure onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// Write, trim or zero on a read-only export.
    Perm,
    /// The backing storage failed.
    Io,
    /// Memory ran out (avoided by the spec's advice, kept for completeness).
    NoMem,
    /// Out-of-range read, misaligned or malformed request, unknown command or flag.
    Inval,
    /// Write past the end, or the backing storage is full.
    NoSpc,
    /// A request larger than the server accepts.
    Overflow,
    /// FAST_ZERO that cannot be fast.
    NotSup,
    /// The server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value sent on the wire.
    pub const fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Reads a wire value back; unknown values are `EINVAL`, as the spec tells clients to do.
    pub const fn from_code(code: u32) -> Errno {
        match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// Maps a host errno from the storage layer (`std::io::Error::raw_os_error`) to the wire.
    /// Disk-full variants become ENOSPC, everything unrecognised becomes EIO.
    pub fn from_host_errno(code: i32) -> Errno {
        // Linux x86_64/aarch64 values; the daemon only runs on Linux.
        match code {
            1 | 13 => Errno::Perm,         // EPERM, EACCES
            12 => Errno::NoMem,            // ENOMEM
            22 => Errno::Inval,            // EINVAL
            27 | 28 | 122 => Errno::NoSpc, // EFBIG, ENOSPC, EDQUOT
            // EOVERFLOW, EOPNOTSUPP and ESHUTDOWN mean something in NBD (an oversized request,
            // a FAST_ZERO that cannot be fast, a server going down: the client MUST then
            // disconnect); from the host's storage they are plain I/O errors.
            _ => Errno::Io,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(e.code()), e);
        }
        assert_eq!(Errno::from_code(9999), Errno::Inval);
    }

    #[test]
    fn host_disk_full_is_enospc() {
        assert_eq!(Errno::from_host_errno(28), Errno::NoSpc);
        assert_eq!(Errno::from_host_errno(122), Errno::NoSpc);
        assert_eq!(Errno::from_host_errno(27), Errno::NoSpc);
        assert_eq!(Errno::from_host_errno(5), Errno::Io);
        assert_eq!(Errno::from_host_errno(9), Errno::Io);
    }

    /// Host errors whose NBD numbers tell the client something specific go out as EIO.
    #[test]
    fn host_errnos_meaningful_in_nbd_become_eio() {
        for code in [75, 95, 108] {
            assert_eq!(Errno::from_host_errno(code), Errno::Io, "host errno {code}");
        }
    }
}
