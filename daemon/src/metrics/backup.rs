//! Backup, restore and verify job series: progress per job (refreshed each second by the
//! backup service) and totals.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
    pub kind: String,
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

/// Write hold of a group snapshot: 50 µs up to ~2.6 s by factors of 2.
fn hold_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

pub struct BackupMetrics {
    pub barrier_hold_seconds: Histogram,
    pub server_last_success_unix_seconds: Family<ServerLabels, Gauge>,
    pub server_last_failure_unix_seconds: Family<ServerLabels, Gauge>,
    pub server_backup_sets: Family<ServerLabels, Gauge>,
    pub server_stored_bytes: Family<ServerLabels, Gauge>,
    pub bytes_done: Family<JobLabels, Gauge>,
    pub bytes_total: Family<JobLabels, Gauge>,
    pub bytes_uploaded: Family<JobLabels, Gauge>,
    pub rate_bytes_per_second: Family<JobLabels, Gauge>,
    pub eta_seconds: Family<JobLabels, Gauge>,
    /// 1 while the job runs (or retries), 0 once it has finished.
    pub running: Family<JobLabels, Gauge>,
    pub jobs_finished: Family<OutcomeLabels, Counter>,
    pub uploaded_bytes: Counter,
    /// The jobs whose series exist, so the ones gone from the job list can be dropped.
    published_jobs: std::sync::Mutex<std::collections::HashSet<JobLabels>>,
}

impl BackupMetrics {
    /// Drops a deleted server's series.
    pub fn forget_server(&self, server: &str) {
        let labels = ServerLabels {
            server: server.to_owned(),
        };
        for family in [
            &self.server_last_success_unix_seconds,
            &self.server_last_failure_unix_seconds,
            &self.server_backup_sets,
            &self.server_stored_bytes,
        ] {
            family.remove(&labels);
        }
    }
}

impl Default for BackupMetrics {
    fn default() -> Self {
        BackupMetrics {
            barrier_hold_seconds: hold_histogram(),
            server_last_success_unix_seconds: Family::default(),
            server_last_failure_unix_seconds: Family::default(),
            server_backup_sets: Family::default(),
            server_stored_bytes: Family::default(),
            bytes_done: Family::default(),
            bytes_total: Family::default(),
            bytes_uploaded: Family::default(),
            rate_bytes_per_second: Family::default(),
            eta_seconds: Family::default(),
            running: Family::default(),
            jobs_finished: Family::default(),
            uploaded_bytes: Counter::default(),
            published_jobs: Default::default(),
        }
    }
}

impl BackupMetrics {
    /// Drops the series of the jobs not in `listed` (those the job list no longer keeps), so
    /// each job's series stop being exported once it is forgotten instead of piling up.
    pub fn keep_only_jobs(&self, listed: std::collections::HashSet<JobLabels>) {
        let mut published = self
            .published_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for gone in published.difference(&listed) {
            for family in [
                &self.bytes_done,
                &self.bytes_total,
                &self.bytes_uploaded,
                &self.rate_bytes_per_second,
                &self.eta_seconds,
                &self.running,
            ] {
                family.remove(gone);
            }
        }
        *published = listed;
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "evsd_group_snapshot_hold_seconds",
            "How long a server backup's barrier held writes on its volumes",
            self.barrier_hold_seconds.clone(),
        );
        let servers: [(&str, &str, &Family<ServerLabels, Gauge>); 4] = [
            (
                "evsd_server_last_backup_success_unix_seconds",
                "When the server's last backup set completed",
                &self.server_last_success_unix_seconds,
            ),
            (
                "evsd_server_last_backup_failure_unix_seconds",
                "When the server's last backup set failed",
                &self.server_last_failure_unix_seconds,
            ),
            (
                "evsd_server_backup_sets",
                "Complete backup sets of the server in the store (as last listed)",
                &self.server_backup_sets,
            ),
            (
                "evsd_server_stored_bytes",
                "Bytes its sets' backups added to the store (as last listed)",
                &self.server_stored_bytes,
            ),
        ];
        for (name, help, family) in servers {
            registry.register(name, help, family.clone());
        }
        let gauges: [(&str, &str, &Family<JobLabels, Gauge>); 6] = [
            (
                "evsd_job_bytes_done",
                "Bytes a job has processed",
                &self.bytes_done,
            ),
            (
                "evsd_job_bytes_total",
                "Bytes a job has to process",
                &self.bytes_total,
            ),
            (
                "evsd_job_bytes_uploaded",
                "Bytes (compressed) a backup job has uploaded",
                &self.bytes_uploaded,
            ),
            (
                "evsd_job_rate_bytes_per_second",
                "A job's average rate since it started",
                &self.rate_bytes_per_second,
            ),
            (
                "evsd_job_eta_seconds",
                "Estimated seconds until a job finishes (-1: unknown)",
                &self.eta_seconds,
            ),
            (
                "evsd_job_running",
                "1 while a job runs, 0 once finished",
                &self.running,
            ),
        ];
        for (name, help, family) in gauges {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "evsd_jobs_finished",
            "Jobs finished, by kind and outcome",
            self.jobs_finished.clone(),
        );
        registry.register(
            "evsd_backup_uploaded_bytes",
            "Bytes (compressed) uploaded to the backup store",
            self.uploaded_bytes.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::metrics::Metrics;

    fn labels(job: &str) -> JobLabels {
        JobLabels {
            job: job.into(),
            kind: "backup".into(),
            volume: "vol0".into(),
        }
    }

    #[test]
    fn series_of_jobs_no_longer_listed_are_dropped() {
        let metrics = Metrics::new();
        let m = metrics.backup();
        for job in ["j-old", "j-new"] {
            m.bytes_done.get_or_create(&labels(job)).set(7);
            m.running.get_or_create(&labels(job)).set(1);
        }
        m.keep_only_jobs(HashSet::from([labels("j-old"), labels("j-new")]));
        let text = metrics.encode();
        assert!(text.contains(r#"job="j-old""#) && text.contains(r#"job="j-new""#));
        m.keep_only_jobs(HashSet::from([labels("j-new")]));
        let text = metrics.encode();
        assert!(!text.contains(r#"job="j-old""#), "{text}");
        assert!(
            text.contains(r#"evsd_job_bytes_done{job="j-new",kind="backup",volume="vol0"} 7"#),
            "{text}"
        );
    }
}
