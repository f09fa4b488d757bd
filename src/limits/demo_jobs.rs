//! How many demo jobs one address may start: a person can start several, a script cannot fill
//! the job table. A token bucket per client (see `buckets`): [`DEMO_BURST`] jobs at once, then
//! one more every [`DEMO_REFILL`].

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::buckets::Buckets;
use super::client::client_key;

/// Demo jobs an address may start at once.
pub const DEMO_BURST: u32 = 10;
/// After the burst, one more demo job per this long.
pub const DEMO_REFILL: Duration = Duration::from_secs(10);

/// The demo's per-address allowance.
#[derive(Debug)]
pub struct DemoJobLimit {
    buckets: Buckets,
}

impl Default for DemoJobLimit {
    fn default() -> Self {
        Self {
            buckets: Buckets::new(DEMO_BURST, DEMO_REFILL),
        }
    }
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
        self.buckets.take_at(key, 1, now, true)
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
}
