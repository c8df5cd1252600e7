//! Throttles: log lines that may repeat at most once per interval, and per-source token
//! buckets for requests that cost someone else work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::listen::SourceKey;

/// Lets at most `lines` log lines per key through per interval; each says how many events
/// it stands for (itself and those suppressed before it).
pub struct LogEvery {
    every: Duration,
    lines: u32,
    seen: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    started: Instant,
    lines: u32,
    suppressed: u64,
}

impl LogEvery {
    pub fn new(every: Duration, lines: u32) -> LogEvery {
        LogEvery {
            every,
            lines,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event; `Some(n)` when it should be logged now.
    pub fn tick(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("log throttle lock");
        let w = seen.entry(key).or_insert(Window {
            started: now,
            lines: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= self.every {
            w.started = now;
            w.lines = 0;
        }
        if w.lines >= self.lines {
            w.suppressed += 1;
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.suppressed) + 1)
    }
}

/// A token bucket per source: `burst` requests at once, refilled at `per_second`.
pub struct PerSource {
    burst: f64,
    per_second: f64,
    max_sources: usize,
    buckets: Mutex<HashMap<SourceKey, (f64, Instant)>>,
}

impl PerSource {
    pub fn new(per_second: f64, burst: u32, max_sources: usize) -> PerSource {
        PerSource {
            burst: f64::from(burst.max(1)),
            per_second,
            max_sources,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `source`; false if it has none left. When more sources are tracked
    /// than `max_sources`, full buckets (sources that have been quiet) are forgotten first;
    /// if none is, the newcomer is refused rather than the table growing without bound.
    pub fn allow(&self, source: SourceKey) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("rate limit lock");
        if !b.contains_key(&source) && b.len() >= self.max_sources {
            let (burst, rate) = (self.burst, self.per_second);
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            if b.len() >= self.max_sources {
                return false;
            }
        }
        let (tokens, at) = b.entry(source).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> SourceKey {
        SourceKey::of(std::net::IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn a_burst_then_the_rate_per_source() {
        let p = PerSource::new(1000.0, 3, 100);
        assert!((0..3).all(|_| p.allow(src(2))));
        assert!(!p.allow(src(2)));
        // Another source has its own bucket.
        assert!(p.allow(src(3)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(p.allow(src(2)));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_quiet_sources_first() {
        let p = PerSource::new(0.001, 2, 2);
        assert!(p.allow(src(2)) && p.allow(src(3)));
        // Both are busy (a token short of full): a third source is refused, not tracked.
        assert!(!p.allow(src(4)));
        let q = PerSource::new(1_000_000.0, 2, 2);
        assert!(q.allow(src(2)) && q.allow(src(3)));
        std::thread::sleep(Duration::from_millis(2));
        // Both refilled: forgotten, the newcomer fits.
        assert!(q.allow(src(4)));
    }

    #[test]
    fn a_few_lines_per_interval_then_the_count() {
        let l = LogEvery::new(Duration::from_secs(3600), 2);
        assert_eq!(l.tick("a"), Some(1));
        assert_eq!(l.tick("a"), Some(1));
        assert_eq!(l.tick("a"), None);
        assert_eq!(l.tick("a"), None);
        assert_eq!(l.tick("b"), Some(1));
        let l = LogEvery::new(Duration::from_millis(1), 1);
        assert_eq!(l.tick("a"), Some(1));
        assert_eq!(l.tick("a"), None);
        assert_eq!(l.tick("a"), None);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(l.tick("a"), Some(3));
    }
}
