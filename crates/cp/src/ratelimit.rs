//! Rate limits per API key: a token bucket per key, refilled at a steady rate up to a burst.
//! Sandbox creates are limited so (`wrenn server --create-rate/--create-burst`): one key
//! cannot flood the fleet, and a refused caller is told when to try again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked before buckets that have filled up again are forgotten.
const TRACKED_KEYS: usize = 10_000;

/// A rate per key: `rate` calls a second on average, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    /// Each key's tokens, as of when they were counted.
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimit {
    /// `rate` calls a second, `burst` at once; a rate of 0 limits nothing.
    pub fn new(rate: f64, burst: u32) -> RateLimit {
        RateLimit {
            rate: rate.max(0.0),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// No limit.
    pub fn unlimited() -> RateLimit {
        RateLimit::new(0.0, 1)
    }

    /// Takes one call of `key`'s: Ok, or how long until it may call again.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() >= TRACKED_KEYS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let refilled =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            return Ok(());
        }
        *tokens = refilled;
        Err(Duration::try_from_secs_f64((1.0 - refilled) / self.rate).unwrap_or(Duration::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_other_keys_their_own() {
        let limit = RateLimit::new(2.0, 3);
        for _ in 0..3 {
            limit.take("a").unwrap();
        }
        let wait = limit.take("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        limit.take("b").unwrap();
        std::thread::sleep(wait + Duration::from_millis(20));
        limit.take("a").unwrap();
        assert!(limit.take("a").is_err());
    }

    #[test]
    fn no_rate_is_no_limit() {
        let limit = RateLimit::unlimited();
        for _ in 0..10_000 {
            limit.take("a").unwrap();
        }
    }
}
