//! Policy schedules: parsing the CLI/admin strings, printing them back, and the slot math.
//!
//! All wall-clock times are UTC and computed from unix seconds directly (no calendar crate):
//! a UTC day is exactly 86 400 s because unix time ignores leap seconds.

use std::fmt;
use std::str::FromStr;

pub const SECS_PER_MINUTE: u64 = 60;
pub const SECS_PER_DAY: u64 = 86_400;
const MINUTES_PER_DAY: u32 = 24 * 60;

/// Why a schedule string was refused, naming the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule {value:?}: {reason}")]
pub struct ScheduleError {
    pub value: String,
    pub reason: String,
}

fn invalid(value: &str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Days of the week, Monday first (the order weekly schedules print in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Weekday::Mon => "MON",
            Weekday::Tue => "TUE",
            Weekday::Wed => "WED",
            Weekday::Thu => "THU",
            Weekday::Fri => "FRI",
            Weekday::Sat => "SAT",
            Weekday::Sun => "SUN",
        }
    }

    /// The weekday of day number `days` since 1970-01-01, which was a Thursday.
    pub fn of_day(days_since_epoch: u64) -> Weekday {
        // Thursday is index 3 with Monday = 0.
        Weekday::ALL[((days_since_epoch + 3) % 7) as usize]
    }

    fn parse(text: &str) -> Option<Weekday> {
        let upper = text.trim().to_ascii_uppercase();
        Weekday::ALL.into_iter().find(|d| d.as_str() == upper)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Every `interval_secs` after the policy's creation.
    Every { interval_secs: u64 },
    /// Each day at `minute_of_day` (0..1440) UTC.
    Daily { minute_of_day: u32 },
    /// On `days` (sorted, no duplicates, non-empty) at `minute_of_day` UTC.
    Weekly {
        days: Vec<Weekday>,
        minute_of_day: u32,
    },
}

impl Schedule {
    /// Parses an interval: a positive integer and a unit s, m, h or d ("30s", "15m", "6h", "1d").
    pub fn every(text: &str) -> Result<Schedule, ScheduleError> {
        let trimmed = text.trim();
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| invalid(text, "missing unit: use s, m, h or d (e.g. \"30s\")"))?;
        let (digits, unit) = trimmed.split_at(digits_end);
        let count: u64 = digits
            .parse()
            .map_err(|_| invalid(text, "expected a positive integer followed by s, m, h or d"))?;
        let unit_secs = match unit.to_ascii_lowercase().as_str() {
            "s" => 1,
            "m" => SECS_PER_MINUTE,
            "h" => 3_600,
            "d" => SECS_PER_DAY,
            _ => {
                return Err(invalid(
                    text,
                    format!("unknown unit {unit:?}: use s, m, h or d"),
                ))
            }
        };
        if count == 0 {
            return Err(invalid(text, "the interval must be greater than zero"));
        }
        let interval_secs = count
            .checked_mul(unit_secs)
            .ok_or_else(|| invalid(text, "the interval is too large"))?;
        Ok(Schedule::Every { interval_secs })
    }

    /// Parses a daily time "HH:MM" (UTC).
    pub fn daily(text: &str) -> Result<Schedule, ScheduleError> {
        let minute_of_day = parse_time(text, text)?;
        Ok(Schedule::Daily { minute_of_day })
    }

    /// Parses "MON,THU@HH:MM" (UTC; day names case-insensitive, each at most once).
    pub fn weekly(text: &str) -> Result<Schedule, ScheduleError> {
        let (day_list, time) = text
            .split_once('@')
            .ok_or_else(|| invalid(text, "expected DAYS@HH:MM, e.g. \"MON,THU@03:30\""))?;
        let mut days = Vec::new();
        for name in day_list.split(',') {
            let day = Weekday::parse(name).ok_or_else(|| {
                invalid(
                    text,
                    format!(
                        "unknown day {:?}: use MON, TUE, WED, THU, FRI, SAT or SUN",
                        name.trim()
                    ),
                )
            })?;
            if days.contains(&day) {
                return Err(invalid(
                    text,
                    format!("day {} is listed twice", day.as_str()),
                ));
            }
            days.push(day);
        }
        days.sort();
        let minute_of_day = parse_time(time, text)?;
        Ok(Schedule::Weekly {
            days,
            minute_of_day,
        })
    }

    /// Builds a schedule from the admin/CLI options, of which exactly one must be given.
    pub fn from_options(
        every: Option<&str>,
        daily: Option<&str>,
        weekly: Option<&str>,
    ) -> Result<Schedule, ScheduleError> {
        match (every, daily, weekly) {
            (Some(text), None, None) => Schedule::every(text),
            (None, Some(text), None) => Schedule::daily(text),
            (None, None, Some(text)) => Schedule::weekly(text),
            _ => {
                // Name what was given, so "both every and daily" is visible in the message.
                let given: Vec<String> = [("every", every), ("daily", daily), ("weekly", weekly)]
                    .into_iter()
                    .filter_map(|(kind, text)| text.map(|t| format!("{kind} {t}")))
                    .collect();
                Err(invalid(
                    &given.join(", "),
                    "give exactly one of every, daily or weekly",
                ))
            }
        }
    }

    /// The latest slot `s` with `anchor < s <= now`, if any.
    pub fn latest_slot_at_or_before(
        &self,
        anchor_unix_secs: u64,
        now_unix_secs: u64,
    ) -> Option<u64> {
        let slot = match self {
            Schedule::Every { interval_secs } => {
                let interval = (*interval_secs).max(1);
                let periods = now_unix_secs.checked_sub(anchor_unix_secs)? / interval;
                if periods == 0 {
                    return None;
                }
                anchor_unix_secs + periods * interval
            }
            Schedule::Daily { minute_of_day } => {
                let offset = minute_offset_secs(*minute_of_day);
                let day = now_unix_secs.checked_sub(offset)? / SECS_PER_DAY;
                day * SECS_PER_DAY + offset
            }
            Schedule::Weekly {
                days,
                minute_of_day,
            } => {
                let offset = minute_offset_secs(*minute_of_day);
                let last_day = now_unix_secs.checked_sub(offset)? / SECS_PER_DAY;
                // Within any 7 consecutive days every weekday occurs once.
                (0..7)
                    .filter_map(|back| last_day.checked_sub(back))
                    .find(|day| days.contains(&Weekday::of_day(*day)))?
                    * SECS_PER_DAY
                    + offset
            }
        };
        (slot > anchor_unix_secs).then_some(slot)
    }

    /// The first slot `s` with `s > t` and `s > anchor`. Saturates at `u64::MAX` (never reached
    /// in practice; also the answer for a weekly schedule without days, which never fires).
    pub fn next_slot_after(&self, anchor_unix_secs: u64, t: u64) -> u64 {
        let after = t.max(anchor_unix_secs);
        match self {
            Schedule::Every { interval_secs } => {
                let interval = (*interval_secs).max(1);
                let periods = (after - anchor_unix_secs) / interval + 1;
                periods
                    .checked_mul(interval)
                    .and_then(|d| anchor_unix_secs.checked_add(d))
                    .unwrap_or(u64::MAX)
            }
            Schedule::Daily { minute_of_day } => {
                let offset = minute_offset_secs(*minute_of_day);
                let today = (after / SECS_PER_DAY) * SECS_PER_DAY + offset;
                if today > after {
                    today
                } else {
                    today.saturating_add(SECS_PER_DAY)
                }
            }
            Schedule::Weekly {
                days,
                minute_of_day,
            } => {
                let offset = minute_offset_secs(*minute_of_day);
                let first_day = after / SECS_PER_DAY;
                // Today's slot may already be past, so look 8 days ahead.
                (0..8)
                    .map(|ahead| first_day + ahead)
                    .filter(|day| days.contains(&Weekday::of_day(*day)))
                    .map(|day| day.saturating_mul(SECS_PER_DAY).saturating_add(offset))
                    .find(|slot| *slot > after)
                    .unwrap_or(u64::MAX)
            }
        }
    }
}

fn minute_offset_secs(minute_of_day: u32) -> u64 {
    // Clamped so a hand-built out-of-range value still yields a time within its day.
    u64::from(minute_of_day.min(MINUTES_PER_DAY - 1)) * SECS_PER_MINUTE
}

/// "HH:MM" with HH 0..=23 (one or two digits) and MM 00..=59 (two digits) -> minute of day.
fn parse_time(time: &str, whole: &str) -> Result<u32, ScheduleError> {
    let bad = || {
        invalid(
            whole,
            format!("time {:?} is not HH:MM (00:00 to 23:59)", time.trim()),
        )
    };
    let (hours, minutes) = time.trim().split_once(':').ok_or_else(bad)?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(hours) || hours.len() > 2 || !all_digits(minutes) || minutes.len() != 2 {
        return Err(bad());
    }
    let hours: u32 = hours.parse().map_err(|_| bad())?;
    let minutes: u32 = minutes.parse().map_err(|_| bad())?;
    if hours > 23 || minutes > 59 {
        return Err(bad());
    }
    Ok(hours * 60 + minutes)
}

fn format_interval(interval_secs: u64) -> String {
    // The largest unit that divides evenly, so "every 90m" prints as "every 90m", not "5400s".
    for (unit_secs, unit) in [(SECS_PER_DAY, "d"), (3_600, "h"), (SECS_PER_MINUTE, "m")] {
        if interval_secs != 0 && interval_secs.is_multiple_of(unit_secs) {
            return format!("{}{unit}", interval_secs / unit_secs);
        }
    }
    format!("{interval_secs}s")
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every { interval_secs } => {
                write!(f, "every {}", format_interval(*interval_secs))
            }
            Schedule::Daily { minute_of_day } => {
                write!(
                    f,
                    "daily {:02}:{:02}",
                    minute_of_day / 60,
                    minute_of_day % 60
                )
            }
            Schedule::Weekly {
                days,
                minute_of_day,
            } => {
                let names: Vec<&str> = days.iter().map(|d| d.as_str()).collect();
                write!(
                    f,
                    "weekly {}@{:02}:{:02}",
                    names.join(","),
                    minute_of_day / 60,
                    minute_of_day % 60
                )
            }
        }
    }
}

/// Parses the printed form: "every 30s", "daily 02:00", "weekly MON,THU@03:30".
impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Schedule, ScheduleError> {
        let (kind, rest) = text.trim().split_once(' ').ok_or_else(|| {
            invalid(
                text,
                "expected \"every N<unit>\", \"daily HH:MM\" or \"weekly DAYS@HH:MM\"",
            )
        })?;
        let parsed = match kind.to_ascii_lowercase().as_str() {
            "every" => Schedule::every(rest),
            "daily" => Schedule::daily(rest),
            "weekly" => Schedule::weekly(rest),
            _ => Err(invalid(
                text,
                format!("unknown schedule kind {kind:?}: use every, daily or weekly"),
            )),
        };
        // Report the whole string, not just the part after the keyword.
        parsed.map_err(|e| invalid(text, e.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-01T00:00:00Z, a Monday.
    const MON_2024_01_01: u64 = 1_704_067_200;

    #[test]
    fn weekday_of_known_dates() {
        assert_eq!(Weekday::of_day(0), Weekday::Thu);
        assert_eq!(Weekday::of_day(MON_2024_01_01 / SECS_PER_DAY), Weekday::Mon);
        assert_eq!(
            Weekday::of_day(MON_2024_01_01 / SECS_PER_DAY + 6),
            Weekday::Sun
        );
    }

    #[test]
    fn every_forms_parse_and_print() {
        for (text, secs, printed) in [
            ("30s", 30, "every 30s"),
            ("15m", 900, "every 15m"),
            ("6h", 21_600, "every 6h"),
            ("1d", 86_400, "every 1d"),
            ("90s", 90, "every 90s"),
            ("120m", 7_200, "every 2h"),
            ("5M", 300, "every 5m"),
        ] {
            let schedule = Schedule::every(text).unwrap();
            assert_eq!(
                schedule,
                Schedule::Every {
                    interval_secs: secs
                },
                "{text}"
            );
            assert_eq!(schedule.to_string(), printed);
            assert_eq!(printed.parse::<Schedule>().unwrap(), schedule);
        }
    }

    #[test]
    fn daily_and_weekly_parse_and_print() {
        let daily = Schedule::daily("02:00").unwrap();
        assert_eq!(daily, Schedule::Daily { minute_of_day: 120 });
        assert_eq!(daily.to_string(), "daily 02:00");
        assert_eq!(Schedule::daily("2:05").unwrap().to_string(), "daily 02:05");
        assert_eq!(
            "daily 23:59".parse::<Schedule>().unwrap().to_string(),
            "daily 23:59"
        );

        let weekly = Schedule::weekly("thu,Mon@03:30").unwrap();
        assert_eq!(
            weekly,
            Schedule::Weekly {
                days: vec![Weekday::Mon, Weekday::Thu],
                minute_of_day: 210
            }
        );
        assert_eq!(weekly.to_string(), "weekly MON,THU@03:30");
        assert_eq!("weekly MON,THU@03:30".parse::<Schedule>().unwrap(), weekly);
        assert_eq!(
            Schedule::weekly("SUN@00:00").unwrap().to_string(),
            "weekly SUN@00:00"
        );
    }

    #[test]
    fn bad_schedules_are_rejected_with_the_value() {
        let bad_every = [
            "0s",
            "5x",
            "",
            "s",
            "10",
            "-5m",
            "1.5h",
            "99999999999999999999d",
        ];
        for text in bad_every {
            let err = Schedule::every(text).unwrap_err();
            assert_eq!(err.value, text);
        }
        for text in ["25:00", "12:60", "1200", "12:5", "ab:cd", "123:00", ""] {
            assert!(Schedule::daily(text).is_err(), "{text}");
        }
        for text in [
            "FOO@01:00",
            "MON,MON@01:00",
            "MON",
            "MON@25:00",
            "@01:00",
            "MON,@01:00",
        ] {
            let err = Schedule::weekly(text).unwrap_err();
            assert!(err.to_string().contains(text), "{err}");
        }
        for text in [
            "hourly 5",
            "every",
            "every 0s",
            "daily 24:00",
            "weekly FOO@01:00",
        ] {
            assert!(text.parse::<Schedule>().is_err(), "{text}");
        }
        let both = Schedule::from_options(Some("1s"), Some("01:00"), None).unwrap_err();
        assert_eq!(both.value, "every 1s, daily 01:00");
        assert!(Schedule::from_options(None, None, None).is_err());
        assert_eq!(
            Schedule::from_options(None, None, Some("MON@01:00"))
                .unwrap()
                .to_string(),
            "weekly MON@01:00"
        );
    }

    #[test]
    fn every_slots_count_from_the_anchor() {
        let s = Schedule::every("30s").unwrap();
        let anchor = 1_000;
        assert_eq!(s.latest_slot_at_or_before(anchor, 999), None);
        assert_eq!(s.latest_slot_at_or_before(anchor, 1_000), None);
        assert_eq!(s.latest_slot_at_or_before(anchor, 1_029), None);
        assert_eq!(s.latest_slot_at_or_before(anchor, 1_030), Some(1_030));
        assert_eq!(s.latest_slot_at_or_before(anchor, 1_095), Some(1_090));
        assert_eq!(s.next_slot_after(anchor, 0), 1_030);
        assert_eq!(s.next_slot_after(anchor, 1_000), 1_030);
        assert_eq!(s.next_slot_after(anchor, 1_030), 1_060);
        assert_eq!(s.next_slot_after(anchor, 1_059), 1_060);
    }

    #[test]
    fn daily_slots_cross_day_boundaries() {
        let s = Schedule::daily("02:00").unwrap();
        let day = MON_2024_01_01;
        let two_am = day + 2 * 3_600;
        // The anchor only bounds: created at 01:00, the first slot is 02:00 the same day.
        assert_eq!(
            s.latest_slot_at_or_before(day + 3_600, day + 3_600 + 59),
            None
        );
        assert_eq!(
            s.latest_slot_at_or_before(day + 3_600, two_am),
            Some(two_am)
        );
        assert_eq!(s.latest_slot_at_or_before(day + 3_600, two_am - 1), None);
        // Created after today's slot: tomorrow's is the first.
        assert_eq!(s.latest_slot_at_or_before(two_am, two_am + 3_600), None);
        assert_eq!(s.next_slot_after(two_am, two_am), two_am + SECS_PER_DAY);
        // Three days later at 01:00 the latest slot is the previous day's.
        assert_eq!(
            s.latest_slot_at_or_before(day, day + 3 * SECS_PER_DAY + 3_600),
            Some(two_am + 2 * SECS_PER_DAY)
        );
        assert_eq!(
            s.next_slot_after(day, day + SECS_PER_DAY - 1),
            two_am + SECS_PER_DAY
        );
        assert_eq!(s.next_slot_after(day, day), two_am);
        // Midnight slot right at the day boundary.
        let midnight = Schedule::daily("00:00").unwrap();
        assert_eq!(midnight.next_slot_after(day - 1, day - 1), day);
        assert_eq!(midnight.latest_slot_at_or_before(0, day), Some(day));
        assert_eq!(
            midnight.latest_slot_at_or_before(0, day - 1),
            Some(day - SECS_PER_DAY)
        );
    }

    #[test]
    fn weekly_slots_cross_week_boundaries() {
        let s = Schedule::weekly("MON,THU@03:30").unwrap();
        let mon = MON_2024_01_01;
        let offset = 3 * 3_600 + 30 * 60;
        let mon_slot = mon + offset;
        let thu_slot = mon + 3 * SECS_PER_DAY + offset;
        let next_mon_slot = mon + 7 * SECS_PER_DAY + offset;
        assert_eq!(s.next_slot_after(mon - 1, mon), mon_slot);
        assert_eq!(s.next_slot_after(mon - 1, mon_slot), thu_slot);
        assert_eq!(s.next_slot_after(mon - 1, thu_slot), next_mon_slot);
        // Sunday evening: the latest slot is last Thursday's; the next is Monday's.
        let sunday_evening = mon + 6 * SECS_PER_DAY + 20 * 3_600;
        assert_eq!(
            s.latest_slot_at_or_before(0, sunday_evening),
            Some(thu_slot)
        );
        assert_eq!(s.next_slot_after(0, sunday_evening), next_mon_slot);
        // Monday 03:29 of the next week: still Thursday's; at 03:30 Monday's.
        assert_eq!(
            s.latest_slot_at_or_before(0, next_mon_slot - 1),
            Some(thu_slot)
        );
        assert_eq!(
            s.latest_slot_at_or_before(0, next_mon_slot),
            Some(next_mon_slot)
        );
        // The anchor bounds: created after Thursday's slot, nothing before next Monday.
        assert_eq!(
            s.latest_slot_at_or_before(thu_slot, next_mon_slot - 1),
            None
        );
        // A single day a week finds the slot six days back.
        let sunday = Schedule::weekly("SUN@23:00").unwrap();
        let prev_sun_slot = mon - SECS_PER_DAY + 23 * 3_600;
        assert_eq!(
            sunday.latest_slot_at_or_before(0, mon + 5 * SECS_PER_DAY),
            Some(prev_sun_slot)
        );
        assert_eq!(
            sunday.next_slot_after(0, prev_sun_slot),
            prev_sun_slot + 7 * SECS_PER_DAY
        );
        // Near the epoch nothing underflows.
        assert_eq!(s.latest_slot_at_or_before(0, 100), None);
    }

    #[test]
    fn slots_are_consistent() {
        // For every schedule: next_slot_after(latest) is the first slot after it, and the
        // latest slot at that next slot is that slot.
        let schedules = [
            Schedule::every("7m").unwrap(),
            Schedule::daily("13:17").unwrap(),
            Schedule::weekly("TUE,SAT,SUN@00:01").unwrap(),
        ];
        let anchor = MON_2024_01_01 + 12_345;
        for s in &schedules {
            let mut t = anchor;
            for _ in 0..40 {
                let next = s.next_slot_after(anchor, t);
                assert!(next > t);
                assert_eq!(s.latest_slot_at_or_before(anchor, next), Some(next), "{s}");
                // No slot lies strictly between t and next.
                let previous = s.latest_slot_at_or_before(anchor, next - 1);
                assert!(previous.is_none_or(|p| p <= t), "{s}");
                t = next;
            }
        }
    }
}
