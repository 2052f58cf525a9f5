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
    // systemd sets JOURNAL_STREAM when stderr is connected to the journal; writing natively
    // keeps each event's level as the journal priority (and its fields as journal fields).
    let mut target = LogTarget::Stderr;
    if std::env::var_os("JOURNAL_STREAM").is_some() {
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
