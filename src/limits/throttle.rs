//! How fast one address may guess the API token, wherever it presents it: on the admin login
//! form or as an API bearer token. Both count against one record per address, since both guess
//! the same secret.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::client::client_key;

/// Wrong tokens an address may present before it has to wait.
pub(super) const FREE_GUESSES: u32 = 5;
/// The first wait; each further wrong token doubles it, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most; beyond it, those no longer waiting are forgotten first.
const MAX_REMEMBERED_ADDRESSES: usize = 10_000;

/// Slows down token guessing per client address: after [`FREE_GUESSES`] wrong tokens, each
/// attempt must wait a doubling time; a right token clears the address's record.
#[derive(Debug, Default)]
pub struct GuessThrottle {
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    blocked_until: Option<Instant>,
}

impl GuessThrottle {
    /// `Err(wait)` while `client` must wait before its next attempt.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = client.map(client_key) else {
            return Ok(());
        };
        let now = Instant::now();
        match self.failures.lock().get(&ip).and_then(|f| f.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a wrong token from `client`; returns how long it must now wait, if at all.
    pub fn failed(&self, client: Option<IpAddr>) -> Option<Duration> {
        let ip = client_key(client?);
        let now = Instant::now();
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_REMEMBERED_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, f| f.blocked_until.is_some_and(|until| until > now));
            // Still full (every address is waiting): forget the one whose wait ends first, so
            // the map never grows past its cap.
            if failures.len() >= MAX_REMEMBERED_ADDRESSES
                && let Some(soonest) = failures
                    .iter()
                    .min_by_key(|(_, f)| f.blocked_until)
                    .map(|(ip, _)| *ip)
            {
                failures.remove(&soonest);
            }
        }
        let entry = failures.entry(ip).or_insert(Failures {
            count: 0,
            blocked_until: None,
        });
        entry.count = entry.count.saturating_add(1);
        let over = entry.count.checked_sub(FREE_GUESSES)?;
        let wait = FIRST_WAIT
            .saturating_mul(2u32.saturating_pow(over.min(20)))
            .min(MAX_WAIT);
        entry.blocked_until = Some(now + wait);
        Some(wait)
    }

    /// A right token: `client` starts afresh.
    pub fn succeeded(&self, client: Option<IpAddr>) {
        if let Some(ip) = client {
            self.failures.lock().remove(&client_key(ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::ip;

    #[test]
    fn the_record_never_grows_past_its_cap_even_when_everyone_waits() {
        let throttle = GuessThrottle::default();
        let blocked = |n: u32| Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
        for n in 0..=u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap() {
            for _ in 0..=FREE_GUESSES {
                throttle.failed(blocked(n));
            }
        }
        assert_eq!(throttle.failures.lock().len(), MAX_REMEMBERED_ADDRESSES);
        assert!(
            throttle
                .check(blocked(u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap()))
                .is_err()
        );
    }

    #[test]
    fn wrong_tokens_beyond_five_wait_a_doubling_time_and_a_success_clears_them() {
        let throttle = GuessThrottle::default();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for _ in 0..4 {
            assert_eq!(throttle.failed(a), None);
        }
        assert_eq!(throttle.failed(a), Some(Duration::from_secs(1)));
        assert!(throttle.check(a).is_err());
        assert!(throttle.check(b).is_ok(), "another address is not affected");
        assert_eq!(throttle.failed(a), Some(Duration::from_secs(2)));
        assert_eq!(throttle.failed(a), Some(Duration::from_secs(4)));
        for _ in 0..40 {
            throttle.failed(a);
        }
        assert_eq!(throttle.failed(a), Some(MAX_WAIT));
        throttle.succeeded(a);
        assert!(throttle.check(a).is_ok());
    }
}
