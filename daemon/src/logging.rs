//! tracing setup: human or JSON lines on stderr, or the systemd journal when systemd runs us.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::settings::LogFormat;

/// Where log lines went, reported once logging works.
pub enum LogTarget {
    Stderr,
    Journal,
    /// JOURNAL_STREAM was set but the journal socket could not be opened.
    StderrJournalUnavailable(std::io::Error),
}

pub fn init(format: LogFormat) -> LogTarget {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // systemd sets JOURNAL_STREAM when stdout or stderr is connected to the journal; writing
    // natively keeps each event's level as the journal priority (and its fields as journal
    // fields). Only when it is stderr (systemd.exec(5): compare its device and inode): the
    // variable is inherited by whatever a service starts, and a unit may send stderr elsewhere.
    let mut target = LogTarget::Stderr;
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    if journal_stream.is_some_and(|stream| stderr_is(&stream)) {
        match tracing_journald::layer() {
            Ok(journal) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(journal.with_syslog_identifier("evsd".to_owned()))
                    .init();
                return LogTarget::Journal;
            }
            Err(e) => target = LogTarget::StderrJournalUnavailable(e),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    target
}

impl LogTarget {
    pub fn report(&self) {
        match self {
            LogTarget::Stderr => {}
            LogTarget::Journal => tracing::debug!("logging to the systemd journal"),
            LogTarget::StderrJournalUnavailable(error) => {
                tracing::warn!(%error, "JOURNAL_STREAM is set but the journal socket is unavailable; logging to stderr")
            }
        }
    }
}

/// Whether stderr is the stream JOURNAL_STREAM names (`DEVICE:INODE`, in decimal).
fn stderr_is(journal_stream: &str) -> bool {
    let Some((device, inode)) = journal_stream.split_once(':') else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `struct stat` into `stat`, which is valid for it, and reads
    // nothing of ours; fd 2 needs no owner for the call (a closed fd fails with EBADF).
    if unsafe { libc::fstat(2, stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so it initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    stat.st_dev == device && stat.st_ino == inode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_stderr_only_when_its_device_and_inode_match() {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as in `stderr_is`.
        assert_eq!(unsafe { libc::fstat(2, stat.as_mut_ptr()) }, 0);
        // SAFETY: fstat succeeded.
        let stat = unsafe { stat.assume_init() };
        assert!(stderr_is(&format!("{}:{}", stat.st_dev, stat.st_ino)));
        assert!(!stderr_is(&format!("{}:{}", stat.st_dev, stat.st_ino + 1)));
        assert!(!stderr_is("1:1"));
        assert!(!stderr_is("garbage"));
    }
}
