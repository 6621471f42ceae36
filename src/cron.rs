//! Cron schedules and time: parsing (5 fields, 6 with seconds, `@hourly` ...) and the next run in a
//! time zone, with Vixie cron's daylight-saving rules.
//!
//! The rules (ARCHITECTURE.md, invariant 9 "One clock"):
//! - A *fixed-time* job (no `*` leading its second, minute or hour field, e.g. `30 2 * * *`) runs
//!   once on a DST-change day: in the skipped spring hour at the first valid instant after it, in
//!   the repeated autumn hour only on the first pass.
//! - An *interval* job (`*/15 * * * *`, `0 * * * *`) follows real elapsed time: skipped local
//!   times do not exist, repeated ones happen twice.
//! - Successive next runs are strictly increasing.
//!
//! croner matches patterns; the mapping from local wall-clock times to instants is done here, so
//! that both rules are ours and tested, not a side effect of a library's search.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A validated cron expression. Holding one means it parses and can match some time.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    cron: Cron,
    interval: bool,
}

/// Local search steps before giving up on a pattern (guards against a pattern that matches
/// only in the distant future, e.g. 29 February on a Monday).
const MAX_STEPS: usize = 100_000;

impl CronSchedule {
    /// Parses a crontab expression: 5 fields (minute hour day-of-month month day-of-week), 6 with
    /// a leading seconds field, or one of `@yearly @annually @monthly @weekly @daily @midnight
    /// @hourly`.
    pub fn parse(expression: &str) -> Result<CronSchedule, String> {
        let trimmed = expression.trim();
        if trimmed.is_empty() {
            return Err("the schedule is empty".into());
        }
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other if other.starts_with('@') => {
                return Err(format!(
                    "unknown shortcut {trimmed:?}: use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
                ))
            }
            _ => trimmed.to_string(),
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 && fields.len() != 6 {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (with seconds first), found {}",
                fields.len()
            ));
        }
        let cron = Cron::new(&expanded)
            .with_seconds_optional()
            .parse()
            .map_err(|e| format!("invalid cron expression: {}", cron_error(&e)))?;
        // Vixie cron: a job whose minute or hour field starts with `*` is an interval job.
        let time_fields = if fields.len() == 6 {
            &fields[..3]
        } else {
            &fields[..2]
        };
        let interval = time_fields.iter().any(|f| f.starts_with('*'));
        let schedule = CronSchedule {
            expression: trimmed.to_string(),
            cron,
            interval,
        };
        // A pattern that can never match (30 February) is as wrong as a syntax error.
        let probe = Utc
            .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
            .single()
            .expect("valid date");
        if schedule.next_naive(probe.naive_utc()).is_none() {
            return Err("the expression never matches a real date".into());
        }
        Ok(schedule)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Whether this follows real elapsed time (`*/5 * * * *`) rather than a fixed wall-clock time.
    pub fn is_interval(&self) -> bool {
        self.interval
    }

    /// The first run strictly after `after`, read in `tz`. `None` if there is none in reach.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let jump = backward_jump(after, tz);
        let local_after = after.with_timezone(&tz).naive_local();
        let mut cursor = local_after - jump;
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..MAX_STEPS {
            cursor = self.next_naive(cursor)?;
            if let Some(best) = best {
                if cursor > best.with_timezone(&tz).naive_local() + jump {
                    break;
                }
            }
            for instant in self.instants(cursor, tz) {
                if instant > after && best.is_none_or(|b| instant < b) {
                    best = Some(instant);
                }
            }
        }
        best
    }

    /// The next `count` runs after `after`, strictly increasing.
    pub fn upcoming(&self, after: DateTime<Utc>, tz: Tz, count: usize) -> Vec<DateTime<Utc>> {
        let mut runs = Vec::with_capacity(count);
        let mut from = after;
        while runs.len() < count {
            match self.next_after(from, tz) {
                Some(next) => {
                    runs.push(next);
                    from = next;
                }
                None => break,
            }
        }
        runs
    }

    /// The next local wall-clock time strictly after `after` that matches the pattern.
    fn next_naive(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        self.cron
            .find_next_occurrence(&after.and_utc(), false)
            .ok()
            .map(|t| t.naive_utc())
    }

    /// The instants at which local time `local` fires, by the DST rules above.
    fn instants(&self, local: NaiveDateTime, tz: Tz) -> Vec<DateTime<Utc>> {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = if a < b { (a, b) } else { (b, a) };
                if self.interval {
                    vec![first.with_timezone(&Utc), second.with_timezone(&Utc)]
                } else {
                    vec![first.with_timezone(&Utc)]
                }
            }
            LocalResult::None => {
                if self.interval {
                    Vec::new()
                } else {
                    vec![first_instant_at_or_after(local, tz)]
                }
            }
        }
    }
}

/// How far local time steps back (an autumn change) within the day after `at`; zero otherwise.
fn backward_jump(at: DateTime<Utc>, tz: Tz) -> Duration {
    let offset = |t: DateTime<Utc>| {
        i64::from(
            tz.offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
        )
    };
    let later = at + Duration::hours(26);
    Duration::seconds((offset(at) - offset(later)).max(0))
}

/// The first instant whose local time is at or after `local`: for a time in a spring-forward
/// gap, the moment the clocks jump.
fn first_instant_at_or_after(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let as_utc = local.and_utc().timestamp();
    let (mut lo, mut hi) = (as_utc - 26 * 3600, as_utc + 26 * 3600);
    let local_of = |secs: i64| {
        DateTime::from_timestamp(secs, 0)
            .map(|t| t.with_timezone(&tz).naive_local())
            .unwrap_or(local)
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if local_of(mid) >= local {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    DateTime::from_timestamp(lo, 0).unwrap_or_else(|| local.and_utc())
}

fn cron_error(error: &croner::errors::CronError) -> String {
    use croner::errors::CronError;
    match error {
        CronError::InvalidPattern(msg) | CronError::IllegalCharacters(msg) => msg.clone(),
        CronError::ComponentError(msg) => msg.clone(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tz: Tz, s: &str) -> DateTime<Utc> {
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        tz.from_local_datetime(&naive)
            .earliest()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn runs(expr: &str, tz: Tz, from: &str, count: usize) -> Vec<String> {
        CronSchedule::parse(expr)
            .unwrap()
            .upcoming(at(tz, from), tz, count)
            .into_iter()
            .map(|t| t.with_timezone(&tz).format("%m-%d %H:%M %Z").to_string())
            .collect()
    }

    const BERLIN: Tz = chrono_tz::Europe::Berlin;
    const NEW_YORK: Tz = chrono_tz::America::New_York;

    #[test]
    fn syntax() {
        assert!(CronSchedule::parse("*/1 * * * *").is_ok());
        assert!(CronSchedule::parse("0 1 * * *").is_ok());
        assert!(CronSchedule::parse("30 0 1 * * *").is_ok());
        for shortcut in [
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "@MIDNIGHT",
        ] {
            assert!(CronSchedule::parse(shortcut).is_ok(), "{shortcut}");
        }
        for bad in [
            "",
            "* * * *",
            "61 * * * *",
            "* 24 * * *",
            "* * * * * * *",
            "@often",
            "a b c d e",
            "0 0 30 2 *",
        ] {
            assert!(CronSchedule::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(CronSchedule::parse("*/15 * * * *").unwrap().is_interval());
        assert!(CronSchedule::parse("@hourly").unwrap().is_interval());
        assert!(!CronSchedule::parse("30 2 * * *").unwrap().is_interval());
        assert!(!CronSchedule::parse("@daily").unwrap().is_interval());
    }

    #[test]
    fn berlin_spring_fixed_time_in_the_gap_runs_at_the_first_valid_instant() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        assert_eq!(
            runs("30 2 * * *", BERLIN, "2026-03-28 12:00", 3),
            ["03-29 03:00 CEST", "03-30 02:30 CEST", "03-31 02:30 CEST"]
        );
        // Two fixed times in the gap still run once.
        assert_eq!(
            runs("0,30 2 * * *", BERLIN, "2026-03-28 12:00", 3),
            ["03-29 03:00 CEST", "03-30 02:00 CEST", "03-30 02:30 CEST"]
        );
    }

    #[test]
    fn berlin_autumn_fixed_time_in_the_repeated_hour_runs_once() {
        // 2026-10-25: 03:00 CEST goes back to 02:00 CET.
        assert_eq!(
            runs("30 2 * * *", BERLIN, "2026-10-24 12:00", 3),
            ["10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET"]
        );
    }

    #[test]
    fn berlin_interval_jobs_follow_real_time() {
        assert_eq!(
            runs("*/30 * * * *", BERLIN, "2026-03-29 01:00", 3),
            ["03-29 01:30 CET", "03-29 03:00 CEST", "03-29 03:30 CEST"]
        );
        assert_eq!(
            runs("*/30 * * * *", BERLIN, "2026-10-25 01:50", 6),
            [
                "10-25 02:00 CEST",
                "10-25 02:30 CEST",
                "10-25 02:00 CET",
                "10-25 02:30 CET",
                "10-25 03:00 CET",
                "10-25 03:30 CET"
            ]
        );
        // Hourly: 23 runs on the spring day, 25 on the autumn day.
        let count_on = |day: &str| {
            CronSchedule::parse("@hourly")
                .unwrap()
                .upcoming(
                    at(BERLIN, &format!("{day} 00:00")) - Duration::seconds(1),
                    BERLIN,
                    30,
                )
                .into_iter()
                .filter(|t| t.with_timezone(&BERLIN).format("%Y-%m-%d").to_string() == day)
                .count()
        };
        assert_eq!(count_on("2026-03-29"), 23);
        assert_eq!(count_on("2026-10-25"), 25);
    }

    #[test]
    fn new_york_spring_and_autumn() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT; 2026-11-01: 02:00 EDT back to 01:00 EST.
        assert_eq!(
            runs("15 2 * * *", NEW_YORK, "2026-03-07 12:00", 2),
            ["03-08 03:00 EDT", "03-09 02:15 EDT"]
        );
        assert_eq!(
            runs("30 1 * * *", NEW_YORK, "2026-10-31 12:00", 2),
            ["11-01 01:30 EDT", "11-02 01:30 EST"]
        );
        assert_eq!(
            runs("*/20 1 * * *", NEW_YORK, "2026-11-01 00:50", 7),
            [
                "11-01 01:00 EDT",
                "11-01 01:20 EDT",
                "11-01 01:40 EDT",
                "11-01 01:00 EST",
                "11-01 01:20 EST",
                "11-01 01:40 EST",
                "11-02 01:00 EST"
            ]
        );
    }

    #[test]
    fn sequences_strictly_increase_across_a_year_of_transitions() {
        for tz in [BERLIN, NEW_YORK, chrono_tz::Australia::Lord_Howe] {
            for expr in [
                "*/7 * * * *",
                "30 2 * * *",
                "0,30 1-3 * * *",
                "@hourly",
                "45 1 * * 0",
            ] {
                let schedule = CronSchedule::parse(expr).unwrap();
                let start = at(tz, "2026-01-01 00:00");
                let times = schedule.upcoming(start, tz, 2000);
                assert!(times.windows(2).all(|w| w[0] < w[1]), "{expr} in {tz}");
                assert!(times[0] > start);
            }
        }
    }

    #[test]
    fn seconds_field() {
        assert_eq!(
            CronSchedule::parse("*/20 * * * * *")
                .unwrap()
                .upcoming(at(Tz::UTC, "2026-01-01 00:00"), Tz::UTC, 3)
                .into_iter()
                .map(|t| t.format("%H:%M:%S").to_string())
                .collect::<Vec<_>>(),
            ["00:00:20", "00:00:40", "00:01:00"]
        );
    }
}
