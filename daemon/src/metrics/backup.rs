//! Backup, restore and verify job series: progress per job (refreshed each second by the
//! backup service) and totals.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

#[derive(Default)]
pub struct BackupMetrics {
    pub bytes_done: Family<JobLabels, Gauge>,
    pub bytes_total: Family<JobLabels, Gauge>,
    pub bytes_uploaded: Family<JobLabels, Gauge>,
    pub rate_bytes_per_second: Family<JobLabels, Gauge>,
    pub eta_seconds: Family<JobLabels, Gauge>,
    /// 1 while the job runs (or retries), 0 once it has finished.
    pub running: Family<JobLabels, Gauge>,
    pub jobs_finished: Family<OutcomeLabels, Counter>,
    pub uploaded_bytes: Counter,
}

impl BackupMetrics {
    pub fn register(&self, registry: &mut Registry) {
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
