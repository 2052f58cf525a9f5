//! Retention: which of a policy's backups (or backup sets) of one target to delete.

use super::schedule::SECS_PER_DAY;

/// The ids among `items` (id, created_unix_secs) that fall outside the limits: beyond the newest
/// `keep`, or older than `keep_days` days at `now_unix_secs`. The newest item always stays, so a
/// policy whose runs stopped (or a clock set wrong) never loses its last backup. Without either
/// limit nothing is deleted. The result is oldest first (ties by id) so deleting in order keeps
/// the survivors a contiguous newest run even if deletion stops halfway.
pub fn to_delete(
    items: &[(String, u64)],
    keep: Option<u32>,
    keep_days: Option<u32>,
    now_unix_secs: u64,
) -> Vec<String> {
    let mut newest_first: Vec<&(String, u64)> = items.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let max_age_secs = keep_days.map(|days| u64::from(days).saturating_mul(SECS_PER_DAY));
    let mut doomed: Vec<&(String, u64)> = newest_first
        .iter()
        .enumerate()
        // Index 0 is the newest item, which always survives.
        .skip(1)
        .filter(|(rank, (_, created_unix_secs))| {
            let beyond_count = keep.is_some_and(|keep| *rank >= keep as usize);
            let too_old = max_age_secs.is_some_and(|max_age_secs| {
                now_unix_secs.saturating_sub(*created_unix_secs) > max_age_secs
            });
            beyond_count || too_old
        })
        .map(|(_, item)| *item)
        .collect();
    doomed.reverse();
    doomed.into_iter().map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items(created: &[u64]) -> Vec<(String, u64)> {
        created
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("b{i}"), *t))
            .collect()
    }

    #[test]
    fn no_limits_delete_nothing() {
        assert!(to_delete(&items(&[1, 2, 3]), None, None, 1_000_000).is_empty());
        assert!(to_delete(&[], Some(1), Some(1), 0).is_empty());
    }

    #[test]
    fn keep_count_deletes_the_oldest_first() {
        let list = items(&[30, 10, 40, 20]);
        assert_eq!(to_delete(&list, Some(2), None, 50), vec!["b1", "b3"]);
        assert_eq!(to_delete(&list, Some(1), None, 50), vec!["b1", "b3", "b0"]);
        assert!(to_delete(&list, Some(4), None, 50).is_empty());
    }

    #[test]
    fn keep_days_deletes_older_items_but_never_the_newest() {
        let now = 10 * SECS_PER_DAY;
        let list = items(&[
            now - 3 * SECS_PER_DAY,
            now - SECS_PER_DAY,
            now - 2 * SECS_PER_DAY - 1,
        ]);
        assert_eq!(to_delete(&list, None, Some(2), now), vec!["b0", "b2"]);
        // Exactly two days old is not older than two days.
        let edge = items(&[now - 2 * SECS_PER_DAY, now]);
        assert!(to_delete(&edge, None, Some(2), now).is_empty());
        // Everything is ancient: the newest still stays.
        let ancient = items(&[1, 2, 3]);
        assert_eq!(to_delete(&ancient, None, Some(1), now), vec!["b0", "b1"]);
    }

    #[test]
    fn both_limits_combine() {
        let now = 100 * SECS_PER_DAY;
        let list = items(&[now - 10 * SECS_PER_DAY, now - 3, now - 2, now - 1]);
        // keep 3 drops b0; keep_days 5 would too; the three recent ones stay.
        assert_eq!(to_delete(&list, Some(3), Some(5), now), vec!["b0"]);
        assert_eq!(to_delete(&list, Some(2), Some(5), now), vec!["b0", "b1"]);
    }

    proptest! {
        #[test]
        fn the_newest_survives_and_keep_is_respected(
            created in proptest::collection::vec(0u64..1_000_000, 0..40),
            keep in proptest::option::of(1u32..10),
            keep_days in proptest::option::of(1u32..10),
            now in 0u64..2_000_000,
        ) {
            let list = items(&created);
            let doomed = to_delete(&list, keep, keep_days, now);
            let survivors: Vec<&(String, u64)> =
                list.iter().filter(|(id, _)| !doomed.contains(id)).collect();
            if !list.is_empty() {
                let newest = list.iter().map(|(_, t)| *t).max().unwrap_or(0);
                prop_assert!(survivors.iter().any(|(_, t)| *t == newest));
            }
            if let Some(keep) = keep {
                prop_assert!(survivors.len() <= keep as usize);
                // keep alone deletes exactly the excess.
                let only_keep = to_delete(&list, Some(keep), None, now);
                prop_assert_eq!(only_keep.len(), list.len().saturating_sub(keep as usize));
            }
            if let Some(days) = keep_days {
                let max_age = u64::from(days) * SECS_PER_DAY;
                // Apart from the newest, nothing older than the limit survives...
                let old_survivors = survivors
                    .iter()
                    .filter(|(_, t)| now.saturating_sub(*t) > max_age)
                    .count();
                prop_assert!(old_survivors <= 1);
            }
            if keep.is_none() && keep_days.is_none() {
                prop_assert!(doomed.is_empty());
            }
            // ...and no item is named twice.
            let mut unique = doomed.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), doomed.len());
        }

        #[test]
        fn recent_items_within_keep_survive(
            created in proptest::collection::vec(0u64..1_000, 1..20),
            keep in 1u32..30,
        ) {
            // With keep_days generous, survivors are exactly the newest min(keep, len).
            let list = items(&created);
            let doomed = to_delete(&list, Some(keep), Some(1_000), 1_000);
            prop_assert_eq!(list.len() - doomed.len(), list.len().min(keep as usize));
        }
    }
}
