//! How many demo jobs one address may start: a person can start several, a script cannot fill
//! the job table. A token bucket per client ([`client_key`]: an IPv4 address or an IPv6 /64):
//! [`DEMO_BURST`] jobs at once, then one more every [`DEMO_REFILL`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::client::client_key;

/// Demo jobs an address may start at once.
pub const DEMO_BURST: u32 = 10;
/// After the burst, one more demo job per this long.
pub const DEMO_REFILL: Duration = Duration::from_secs(10);
/// Addresses remembered at most; beyond it, those whose bucket is full again are forgotten first.
const MAX_REMEMBERED_ADDRESSES: usize = 10_000;

/// The demo's per-address allowance. Each address is remembered by one instant (the generic
/// cell rate algorithm's "theoretical arrival time"): the moment its bucket is full again.
#[derive(Debug, Default)]
pub struct DemoJobLimit {
    full_again: Mutex<HashMap<IpAddr, Instant>>,
}

impl DemoJobLimit {
    /// Takes one demo job from `client`'s allowance, or says how long it must wait for the next.
    /// A request with no known address (no TCP peer) is not limited.
    pub fn take(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        match client {
            Some(ip) => self.take_at(client_key(ip), Instant::now()),
            None => Ok(()),
        }
    }

    fn take_at(&self, key: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut addresses = self.full_again.lock();
        let full_again = addresses.get(&key).copied().unwrap_or(now).max(now);
        let after = full_again + DEMO_REFILL;
        // The bucket holds DEMO_BURST jobs' worth of refill time.
        let room = DEMO_REFILL * DEMO_BURST;
        if after - now > room {
            return Err(after - now - room);
        }
        if addresses.len() >= MAX_REMEMBERED_ADDRESSES && !addresses.contains_key(&key) {
            addresses.retain(|_, at| *at > now);
            // Still full (every address is busy): forget the one whose bucket fills first.
            if addresses.len() >= MAX_REMEMBERED_ADDRESSES
                && let Some(soonest) = addresses.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
            {
                addresses.remove(&soonest);
            }
        }
        addresses.insert(key, after);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::ip;

    #[test]
    fn an_address_starts_its_burst_then_one_job_per_refill_and_others_are_not_affected() {
        let limit = DemoJobLimit::default();
        let (a, b) = (ip("10.0.0.1").unwrap(), ip("10.0.0.2").unwrap());
        let now = Instant::now();
        for _ in 0..DEMO_BURST {
            assert_eq!(limit.take_at(a, now), Ok(()));
        }
        assert_eq!(limit.take_at(a, now), Err(DEMO_REFILL));
        assert_eq!(
            limit.take_at(a, now + DEMO_REFILL / 2),
            Err(DEMO_REFILL / 2)
        );
        assert_eq!(limit.take_at(b, now), Ok(()), "another address has its own");
        assert_eq!(limit.take_at(a, now + DEMO_REFILL), Ok(()));
        assert!(limit.take_at(a, now + DEMO_REFILL).is_err());
        let rested = now + DEMO_REFILL * (DEMO_BURST + 1);
        for _ in 0..DEMO_BURST {
            assert_eq!(
                limit.take_at(a, rested),
                Ok(()),
                "a rested address has its burst again"
            );
        }
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let limit = DemoJobLimit::default();
        for n in 0..DEMO_BURST {
            assert!(limit.take(ip(&format!("2001:db8:1:2::{n:x}"))).is_ok());
        }
        assert!(limit.take(ip("2001:db8:1:2:ffff::1")).is_err());
        assert!(limit.take(ip("2001:db8:1:3::1")).is_ok());
        assert!(limit.take(None).is_ok(), "no address, no limit");
    }

    #[test]
    fn the_record_never_grows_past_its_cap_even_when_everyone_waits() {
        let limit = DemoJobLimit::default();
        let now = Instant::now();
        let busy = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..=u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap() {
            limit.take_at(busy(n), now).unwrap();
        }
        let remembered = limit.full_again.lock().len();
        assert_eq!(remembered, MAX_REMEMBERED_ADDRESSES);
    }
}
