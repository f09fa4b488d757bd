//! How fast one address may guess a secret. Each secret has a throttle of its own (the admin
//! login form's, the API bearer tokens'), so that wrong passwords typed in a browser never slow
//! down a job runner's right token from the same address.

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
/// Addresses remembered at most; beyond it, those never made to wait are forgotten first.
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
            // An escalated address (one made to wait) keeps its count even after its wait ended:
            // forgetting it would let whoever controls many addresses fill the map and so reset
            // every guesser's wait. Those still within their free guesses lose little.
            failures.retain(|_, f| f.blocked_until.is_some());
            // Still full (every address escalated): forget the least escalated, so the map never
            // grows past its cap.
            if failures.len() >= MAX_REMEMBERED_ADDRESSES
                && let Some(least) = failures
                    .iter()
                    .min_by_key(|(_, f)| (f.count, f.blocked_until))
                    .map(|(ip, _)| *ip)
            {
                failures.remove(&least);
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
    fn a_full_map_forgets_addresses_within_their_free_guesses_before_an_escalated_one() {
        let throttle = GuessThrottle::default();
        let guesser = ip("192.0.2.1");
        for _ in 0..FREE_GUESSES + 3 {
            throttle.failed(guesser);
        }
        // Its last wait has ended: it may try again, but its count stands.
        if let Some(f) = throttle
            .failures
            .lock()
            .get_mut(&client_key(guesser.unwrap()))
        {
            f.blocked_until = Some(Instant::now());
        }
        assert!(throttle.check(guesser).is_ok());
        let other = |n: u32| Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
        for n in 0..2 * u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap() {
            throttle.failed(other(n));
        }
        assert!(throttle.failures.lock().len() <= MAX_REMEMBERED_ADDRESSES);
        assert_eq!(
            throttle.failed(guesser),
            Some(Duration::from_secs(16)),
            "the guesser's next wrong token doubles its wait, as if no one had flooded the map"
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
