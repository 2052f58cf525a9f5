//! Backup policy series: when each policy last succeeded or failed, what it keeps, and whether
//! it is running. Kept current by `crate::policy::Policies` after every change.

// Wired into the daemon together with crate::policy; remove then.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Default)]
pub struct PolicyMetrics {
    /// 0 until the policy first succeeds.
    pub last_success_unix_seconds: Family<PolicyLabels, Gauge>,
    /// 0 until the policy first fails.
    pub last_failure_unix_seconds: Family<PolicyLabels, Gauge>,
    pub backups_kept: Family<PolicyLabels, Gauge>,
    pub stored_bytes: Family<PolicyLabels, Gauge>,
    /// 1 while a run of the policy is in progress.
    pub running: Family<PolicyLabels, Gauge>,
}

/// One policy's current values, as `Policies` sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicySample {
    pub last_success_unix_secs: Option<u64>,
    pub last_failure_unix_secs: Option<u64>,
    pub backups_kept: u64,
    pub stored_bytes: u64,
    pub running: bool,
}

fn gauge_value(value: u64) -> i64 {
    // Gauges are i64; no real timestamp or byte count comes near the limit.
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PolicyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        for (name, help, family) in self.families() {
            registry.register(name, help, family.clone());
        }
    }

    /// Sets every series of `policy` to `sample`.
    pub fn update(&self, policy: &str, sample: &PolicySample) {
        let labels = PolicyLabels {
            policy: policy.to_owned(),
        };
        let values = [
            sample.last_success_unix_secs.unwrap_or(0),
            sample.last_failure_unix_secs.unwrap_or(0),
            sample.backups_kept,
            sample.stored_bytes,
            u64::from(sample.running),
        ];
        for ((_, _, family), value) in self.families().into_iter().zip(values) {
            family.get_or_create(&labels).set(gauge_value(value));
        }
    }

    /// Drops the series of a deleted policy so it stops being exported.
    pub fn remove(&self, policy: &str) {
        let labels = PolicyLabels {
            policy: policy.to_owned(),
        };
        for (_, _, family) in self.families() {
            family.remove(&labels);
        }
    }

    fn families(&self) -> [(&'static str, &'static str, &Family<PolicyLabels, Gauge>); 5] {
        [
            (
                "evsd_policy_last_success_unix_seconds",
                "When the policy's last successful run finished (0: never)",
                &self.last_success_unix_seconds,
            ),
            (
                "evsd_policy_last_failure_unix_seconds",
                "When the policy's last failed run finished (0: never)",
                &self.last_failure_unix_seconds,
            ),
            (
                "evsd_policy_backups_kept",
                "Backups (or backup sets) the policy keeps after its last run",
                &self.backups_kept,
            ),
            (
                "evsd_policy_stored_bytes",
                "Bytes stored by the backups the policy keeps",
                &self.stored_bytes,
            ),
            (
                "evsd_policy_running",
                "1 while a run of the policy is in progress",
                &self.running,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_updates_and_removal() {
        let metrics = PolicyMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.update(
            "nightly",
            &PolicySample {
                last_success_unix_secs: Some(1_700_000_000),
                last_failure_unix_secs: None,
                backups_kept: 3,
                stored_bytes: 4096,
                running: true,
            },
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"evsd_policy_last_success_unix_seconds{policy="nightly"} 1700000000"#,
            r#"evsd_policy_last_failure_unix_seconds{policy="nightly"} 0"#,
            r#"evsd_policy_backups_kept{policy="nightly"} 3"#,
            r#"evsd_policy_stored_bytes{policy="nightly"} 4096"#,
            r#"evsd_policy_running{policy="nightly"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in {text}");
        }
        metrics.remove("nightly");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("nightly"), "{text}");
    }
}
