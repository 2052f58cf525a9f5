//! `--wait`: polls `job.show` until every job has finished, drawing a progress bar per job on
//! stderr: `vol0 backup  [#########-----------]  45%  1.8 GiB / 4.0 GiB  612.0 MiB/s  ETA 4s`.
//! On a terminal the bars are redrawn in place; otherwise one line per job every 2 s (so logs
//! stay readable), plus the final state.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{AdminClient, Call};
use crate::error::CliError;
use crate::job::{JobInfo, JobState};
use crate::render::iec_size;

/// Characters between the bar's brackets.
pub const BAR_WIDTH: usize = 20;

/// How often `job.show` is asked.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often a line per job is written when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(2);

/// `done` of `total` in whole percent, floored and capped at 100; 0 while the total is unknown.
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
}

/// `[#########-----------]` for 45%, `width` characters between the brackets.
pub fn bar(percent: u64, width: usize) -> String {
    let filled = (percent.min(100) as usize * width) / 100;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Seconds as `4s`, `2m05s` or `1h02m` (days are hours: `50h00m`).
pub fn format_eta(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

/// Bytes per second as `612.0 MiB/s`; a negative or non-finite rate is 0.
pub fn format_rate(bytes_per_sec: f64) -> String {
    let bytes = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
        bytes_per_sec as u64
    } else {
        0
    };
    format!("{}/s", iec_size(bytes))
}

/// One job's progress line (without a newline).
pub fn progress_line(job: &JobInfo) -> String {
    let p = &job.progress;
    let percent = job.percent();
    let tail = match job.state {
        JobState::Running => format!("ETA {}", job.eta()),
        JobState::Retrying => "retrying".to_owned(),
        JobState::Succeeded => "done".to_owned(),
        JobState::Failed => "failed".to_owned(),
        JobState::Cancelled => "cancelled".to_owned(),
    };
    // An incremental backup of an unchanged volume reads nothing: say so rather than "0 B / 0 B".
    let transferred =
        if job.kind == "backup" && job.state == JobState::Succeeded && p.bytes_total == 0 {
            "nothing changed since the base".to_owned()
        } else {
            format!(
                "{} / {}  {}",
                iec_size(p.bytes_done),
                iec_size(p.bytes_total),
                job.rate()
            )
        };
    format!(
        "{} {}  {} {percent:>3}%  {transferred}  {tail}",
        job.volume,
        job.kind,
        bar(percent, BAR_WIDTH),
    )
}

/// Where the jobs' state comes from: the daemon, or a script in tests.
pub trait JobSource {
    /// The job's state; a running job may be waited on for up to `wait` before the answer.
    fn show(&mut self, id: &str, wait: Duration) -> Result<Value, CliError>;
}

impl JobSource for AdminClient {
    fn show(&mut self, id: &str, wait: Duration) -> Result<Value, CliError> {
        self.call(&Call {
            method: "job.show",
            params: json!({"id": id, "wait_ms": wait.as_millis() as u64}),
        })
    }
}

/// The polling loop's settings.
#[derive(Debug, Clone, Copy)]
pub struct Waiter {
    pub poll: Duration,
    pub log_every: Duration,
    /// Redraw in place (a terminal) rather than logging a line per job now and then.
    pub in_place: bool,
}

impl Waiter {
    /// 200 ms polls, drawn in place when stderr is a terminal.
    pub fn for_stderr() -> Waiter {
        Waiter {
            poll: POLL_INTERVAL,
            log_every: LOG_INTERVAL,
            in_place: std::io::stderr().is_terminal(),
        }
    }

    /// Polls each job until all have succeeded or failed; returns their final JSON in the order
    /// of `ids`. Drawing failures are ignored: progress is a courtesy, the result is what counts.
    pub fn wait(
        &self,
        source: &mut impl JobSource,
        ids: &[String],
        draw: &mut impl Write,
    ) -> Result<Vec<Value>, CliError> {
        let mut latest: Vec<Option<(Value, JobInfo)>> = vec![None; ids.len()];
        let mut drawn_lines = 0;
        let mut last_log: Option<Instant> = None;
        let mut first_round = true;
        loop {
            // After the first round, the first unfinished job is asked with a wait: the daemon
            // answers when it ends or after one poll interval, which is the pause between
            // rounds. So the end is seen at once, without polling often.
            let waited = !first_round;
            let mut wait = if waited { self.poll } else { Duration::ZERO };
            first_round = false;
            let round_started = Instant::now();
            for (id, slot) in ids.iter().zip(latest.iter_mut()) {
                let finished = matches!(slot, Some((_, job)) if job.state.is_finished());
                if !finished {
                    let value = source.show(id, wait)?;
                    wait = Duration::ZERO;
                    let job = JobInfo::parse(&value)?;
                    *slot = Some((value, job));
                }
            }
            let jobs: Vec<&JobInfo> = latest.iter().flatten().map(|(_, job)| job).collect();
            let all_done = jobs.iter().all(|job| job.state.is_finished());
            let lines: Vec<String> = jobs.iter().map(|job| progress_line(job)).collect();
            if self.in_place {
                // A line that wraps, or more lines than the screen has, would put the cursor
                // somewhere the next redraw does not expect: bars pile up down the screen.
                let (columns, rows) = terminal_size();
                let lines = fit(lines, columns, rows);
                let _ = draw.write_all(redraw(&lines, drawn_lines).as_bytes());
                drawn_lines = lines.len();
            } else if all_done || last_log.is_none_or(|at| at.elapsed() >= self.log_every) {
                let _ = draw.write_all(log_lines(&lines).as_bytes());
                last_log = Some(Instant::now());
            }
            let _ = draw.flush();
            if all_done {
                return Ok(latest
                    .into_iter()
                    .flatten()
                    .map(|(value, _)| value)
                    .collect());
            }
            // The first round (drawn at once) is followed at once by a waited one. A daemon
            // that answered a wait early with the job still running (one that does not wait)
            // still gets a round no more often than the poll interval.
            if waited {
                if let Some(rest) = self.poll.checked_sub(round_started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
    }
}

/// The terminal's columns and rows (stderr's; else $COLUMNS and $LINES; else 80 × 24).
fn terminal_size() -> (usize, usize) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct passed, which lives on this
    // stack frame for the call; fd 2 is only queried, and an error leaves `size` zeroed.
    let asked = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) };
    let from_env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(default)
    };
    if asked == 0 && size.ws_col > 0 && size.ws_row > 0 {
        (usize::from(size.ws_col), usize::from(size.ws_row))
    } else {
        (from_env("COLUMNS", 80), from_env("LINES", 24))
    }
}

/// `lines` cut to fit a `columns` × `rows` screen when redrawn in place: each shorter than the
/// width (a full-width line may wrap the cursor), and at most `rows - 1` lines, the last of
/// them counting the jobs left out.
pub fn fit(mut lines: Vec<String>, columns: usize, rows: usize) -> Vec<String> {
    let max_lines = rows.saturating_sub(1).max(1);
    if lines.len() > max_lines {
        let shown = max_lines - 1;
        let hidden = lines.len() - shown;
        lines.truncate(shown);
        lines.push(format!("… and {hidden} more jobs"));
    }
    let width = columns.saturating_sub(1).max(1);
    for line in &mut lines {
        if let Some((cut, _)) = line.char_indices().nth(width) {
            line.truncate(cut);
        }
    }
    lines
}

/// Moves the cursor up over the `previous` lines drawn last time and draws `lines` over them.
pub fn redraw(lines: &[String], previous: usize) -> String {
    let mut out = String::new();
    if previous > 0 {
        out.push_str(&format!("\x1b[{previous}A"));
    }
    for line in lines {
        out.push_str(&format!("\r\x1b[2K{line}\n"));
    }
    out
}

fn log_lines(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::job::tests::sample;

    #[test]
    fn lines_redrawn_in_place_fit_the_screen() {
        let long = "web1-root-restored restore  [##########----------]  50%  2.0 GiB / 4.0 GiB  612.0 MiB/s  ETA 2m05s".to_owned();
        let fitted = fit(vec![long.clone(), "a".into()], 80, 24);
        assert_eq!(fitted[0].chars().count(), 79);
        assert!(long.starts_with(&fitted[0]));
        assert_eq!(fitted[1], "a");
        let many: Vec<String> = (0..30).map(|i| format!("job {i}")).collect();
        let fitted = fit(many, 80, 10);
        assert_eq!(fitted.len(), 9);
        assert_eq!(fitted[7], "job 7");
        assert_eq!(fitted[8], "… and 22 more jobs");
        assert_eq!(fit(vec!["x".repeat(5)], 0, 0), ["x"]);
    }

    #[test]
    fn percent_is_floored_and_capped() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(0, 100), 0);
        assert_eq!(percent(45, 100), 45);
        assert_eq!(percent(999, 1000), 99);
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(2000, 1000), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }

    #[test]
    fn bars_have_a_fixed_width() {
        assert_eq!(bar(45, 20), "[#########-----------]");
        assert_eq!(bar(0, 20), "[--------------------]");
        assert_eq!(bar(100, 20), "[####################]");
        assert_eq!(bar(250, 4), "[####]");
        for p in 0..=100 {
            assert_eq!(bar(p, BAR_WIDTH).len(), BAR_WIDTH + 2);
        }
    }

    #[test]
    fn etas_and_rates() {
        assert_eq!(format_eta(0), "0s");
        assert_eq!(format_eta(4), "4s");
        assert_eq!(format_eta(59), "59s");
        assert_eq!(format_eta(60), "1m00s");
        assert_eq!(format_eta(125), "2m05s");
        assert_eq!(format_eta(3599), "59m59s");
        assert_eq!(format_eta(3600 + 120 + 30), "1h02m");
        assert_eq!(format_eta(50 * 3600), "50h00m");
        assert_eq!(format_rate(612.0 * 1048576.0), "612.0 MiB/s");
        assert_eq!(format_rate(0.0), "0 B/s");
        assert_eq!(format_rate(-1.0), "0 B/s");
        assert_eq!(format_rate(f64::NAN), "0 B/s");
    }

    #[test]
    fn lines_show_bar_sizes_rate_and_eta() {
        let running = sample("j-1", "running", 1_932_735_284, 4 << 30);
        assert_eq!(
            progress_line(&JobInfo::parse(&running).unwrap()),
            "vol0 backup  [#########-----------]  45%  1.8 GiB / 4.0 GiB  612.0 MiB/s  ETA 4s"
        );
        let done = sample("j-1", "succeeded", 0, 0);
        assert!(progress_line(&JobInfo::parse(&done).unwrap())
            .ends_with("[####################] 100%  nothing changed since the base  done"));
        let retrying = sample("j-1", "retrying", 0, 8);
        assert!(progress_line(&JobInfo::parse(&retrying).unwrap()).ends_with("retrying"));
    }

    #[test]
    fn redraw_moves_up_over_the_previous_lines() {
        let lines = ["a".to_owned(), "b".to_owned()];
        assert_eq!(redraw(&lines, 0), "\r\x1b[2Ka\n\r\x1b[2Kb\n");
        assert_eq!(redraw(&lines, 2), "\x1b[2A\r\x1b[2Ka\n\r\x1b[2Kb\n");
    }

    /// Answers each job's polls from a script; the last answer repeats. Counts the polls and
    /// records each one's job and wait.
    struct Script(
        Vec<(String, VecDeque<Value>)>,
        usize,
        Vec<(String, Duration)>,
    );

    impl JobSource for Script {
        fn show(&mut self, id: &str, wait: Duration) -> Result<Value, CliError> {
            self.1 += 1;
            self.2.push((id.to_owned(), wait));
            let (_, answers) = self
                .0
                .iter_mut()
                .find(|(job, _)| job == id)
                .ok_or_else(|| CliError::Daemon {
                    code: "not_found".into(),
                    message: id.into(),
                })?;
            let answer = answers.front().cloned().unwrap();
            if answers.len() > 1 {
                answers.pop_front();
            }
            Ok(answer)
        }
    }

    /// j-1 runs, then succeeds; j-2 runs, retries, then fails.
    fn two_jobs() -> Script {
        Script(
            vec![
                (
                    "j-1".into(),
                    VecDeque::from([
                        sample("j-1", "running", 1, 4),
                        sample("j-1", "succeeded", 4, 4),
                    ]),
                ),
                (
                    "j-2".into(),
                    VecDeque::from([
                        sample("j-2", "running", 1, 4),
                        sample("j-2", "retrying", 2, 4),
                        sample("j-2", "failed", 2, 4),
                    ]),
                ),
            ],
            0,
            Vec::new(),
        )
    }

    fn waiter(in_place: bool) -> Waiter {
        Waiter {
            poll: Duration::ZERO,
            log_every: Duration::from_secs(3600),
            in_place,
        }
    }

    #[test]
    fn waits_until_every_job_finished() {
        let mut script = two_jobs();
        let mut drawn = Vec::new();
        let ids = ["j-1".to_owned(), "j-2".to_owned()];
        let finals = waiter(false).wait(&mut script, &ids, &mut drawn).unwrap();
        assert_eq!(finals[0]["state"], "succeeded");
        assert_eq!(finals[1]["state"], "failed");
        // j-1 is not asked again once it has finished: 2 + 3 polls.
        assert_eq!(script.1, 5);
        // Logged once at the start and once at the end (the log interval is an hour).
        let drawn = String::from_utf8(drawn).unwrap();
        assert_eq!(drawn.lines().count(), 4, "{drawn}");
        assert!(drawn.lines().last().unwrap().ends_with("failed"));
        assert!(!drawn.contains('\r'));
    }

    #[test]
    fn in_place_drawing_redraws_and_errors_stop_the_wait() {
        let mut script = Script(
            vec![(
                "j-1".into(),
                VecDeque::from([
                    sample("j-1", "running", 1, 4),
                    sample("j-1", "succeeded", 4, 4),
                ]),
            )],
            0,
            Vec::new(),
        );
        let mut drawn = Vec::new();
        waiter(true)
            .wait(&mut script, &["j-1".to_owned()], &mut drawn)
            .unwrap();
        let drawn = String::from_utf8(drawn).unwrap();
        assert_eq!(drawn.matches('\r').count(), 2);
        assert_eq!(drawn.matches("\x1b[1A").count(), 1);

        let error = waiter(true)
            .wait(&mut script, &["j-9".to_owned()], &mut Vec::new())
            .unwrap_err();
        assert_eq!(error.exit_code(), 4);
        let mut malformed = Script(
            vec![("j-1".into(), VecDeque::from([json!({})]))],
            0,
            Vec::new(),
        );
        let error = waiter(true)
            .wait(&mut malformed, &["j-1".to_owned()], &mut Vec::new())
            .unwrap_err();
        assert!(matches!(error, CliError::Protocol(_)));
    }

    #[test]
    fn after_the_first_round_the_first_unfinished_job_is_waited_on() {
        let poll = Duration::from_millis(20);
        let mut script = two_jobs();
        let waiter = Waiter {
            poll,
            ..waiter(false)
        };
        let started = Instant::now();
        let ids = ["j-1".to_owned(), "j-2".to_owned()];
        waiter.wait(&mut script, &ids, &mut Vec::new()).unwrap();
        let asked: Vec<(&str, Duration)> = script.2.iter().map(|(j, w)| (j.as_str(), *w)).collect();
        let zero = Duration::ZERO;
        assert_eq!(
            asked,
            [
                ("j-1", zero),
                ("j-2", zero),
                ("j-1", poll),
                ("j-2", zero),
                ("j-2", poll)
            ]
        );
        // The script answers at once, so the loop itself paused after the waited round that
        // left j-2 running (not after the first round, nor after the last).
        let took = started.elapsed();
        assert!(took >= poll, "{took:?}");
    }
}
