//! Token buckets per client ([`client_key`]: an IPv4 address or an IPv6 /64), the shape of
//! every per-client rate limit here: a burst at once, then one more every refill period.
//!
//! Each client is remembered by one instant (the generic cell rate algorithm's "theoretical
//! arrival time"): the moment its bucket is full again. A client with a full bucket needs no
//! entry, so the map holds only clients that spent something lately, and never more than
//! [`MAX_REMEMBERED_CLIENTS`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Clients remembered at most; beyond it, those whose bucket is full again are forgotten first,
/// then the one whose bucket fills first.
const MAX_REMEMBERED_CLIENTS: usize = 10_000;

#[derive(Debug)]
pub(super) struct Buckets {
    burst: u32,
    refill: Duration,
    /// Never held across an `.await`; each critical section is one map update.
    full_again: Mutex<HashMap<IpAddr, Instant>>,
}

impl Buckets {
    pub(super) fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst,
            refill,
            full_again: Mutex::default(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.full_again.lock()
    }

    /// How long `key` must wait for one token at `now`, or `None` when it has one.
    pub(super) fn wait_at(&self, key: IpAddr, now: Instant) -> Option<Duration> {
        let full_again = self.lock().get(&key).copied().unwrap_or(now).max(now);
        let after = full_again + self.refill;
        let room = self.refill * self.burst;
        (after - now > room).then(|| after - now - room)
    }

    /// Takes `n` tokens from `key`'s bucket at `now`. With `all_or_nothing`, refused (and
    /// nothing taken) unless all `n` are there; otherwise always taken, the bucket going into
    /// debt that the client waits off before [`Buckets::wait_at`] lets it in again.
    pub(super) fn take_at(
        &self,
        key: IpAddr,
        n: u32,
        now: Instant,
        all_or_nothing: bool,
    ) -> Result<(), Duration> {
        let mut clients = self.lock();
        let full_again = clients.get(&key).copied().unwrap_or(now).max(now);
        let after = full_again + self.refill * n;
        let room = self.refill * self.burst;
        if all_or_nothing && after - now > room {
            return Err(after - now - room);
        }
        if clients.len() >= MAX_REMEMBERED_CLIENTS && !clients.contains_key(&key) {
            clients.retain(|_, at| *at > now);
            // Still full (every client is busy): forget the one whose bucket fills first.
            if clients.len() >= MAX_REMEMBERED_CLIENTS
                && let Some(soonest) = clients.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
            {
                clients.remove(&soonest);
            }
        }
        clients.insert(key, after);
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_never_grows_past_its_cap_even_when_everyone_waits() {
        let buckets = Buckets::new(10, Duration::from_secs(10));
        let now = Instant::now();
        let busy = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..=u32::try_from(MAX_REMEMBERED_CLIENTS).unwrap() {
            buckets.take_at(busy(n), 1, now, true).unwrap();
        }
        assert_eq!(buckets.remembered(), MAX_REMEMBERED_CLIENTS);
    }
}
