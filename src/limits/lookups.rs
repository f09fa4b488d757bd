//! How many unknown job ids one client may ask about: a job id is 128 random bits, so only a
//! mistake or a scan asks for many that do not exist, and each costs a database read. A token
//! bucket per client (see `buckets`): [`LOOKUP_BURST`] unknown ids at once, then one more every
//! [`LOOKUP_REFILL`].
//!
//! Only ids found missing spend it, after the read: a job runner polling its own jobs, or a
//! browser watching its tabs' jobs, never does. A lookup is let in while the client has a token
//! left; a watch of 32 unknown ids spends 32 and may leave the bucket in debt, which the client
//! waits off before its next lookup. Concurrent lookups may each pass before any of them
//! spends, so a client can overdraw by one read per request in flight; the debt then keeps it
//! out longer.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::buckets::Buckets;
use super::client::client_key;

/// Unknown ids a client may ask about at once: a person's mistyped links and a browser's
/// purged jobs fit many times over.
pub const LOOKUP_BURST: u32 = 256;
/// After the burst, one more unknown id per this long (600 a minute).
pub const LOOKUP_REFILL: Duration = Duration::from_millis(100);

/// The per-client budget for lookups of unknown job ids.
#[derive(Debug)]
pub struct LookupBudget {
    buckets: Buckets,
}

impl Default for LookupBudget {
    fn default() -> Self {
        Self {
            buckets: Buckets::new(LOOKUP_BURST, LOOKUP_REFILL),
        }
    }
}

impl LookupBudget {
    /// Whether `client` may look up jobs now, or how long it must wait. A request with no known
    /// address (no TCP peer) is not limited.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        match client {
            Some(ip) => self
                .buckets
                .wait_at(client_key(ip), Instant::now())
                .map_or(Ok(()), Err),
            None => Ok(()),
        }
    }

    /// Spends `unknown` from `client`'s budget: that many of the ids it asked about do not exist.
    pub fn missed(&self, client: Option<IpAddr>, unknown: usize) {
        let (Some(ip), Ok(n @ 1..)) = (client, u32::try_from(unknown)) else {
            return;
        };
        // Taking with debt allowed never fails.
        let _ = self
            .buckets
            .take_at(client_key(ip), n, Instant::now(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::ip;

    #[test]
    fn only_unknown_ids_spend_the_budget_and_a_watch_of_many_may_overdraw_it() {
        let budget = LookupBudget::default();
        let (a, b) = (ip("10.0.0.1"), ip("2001:db8:1:2::1"));
        budget.missed(a, 0);
        assert!(budget.check(a).is_ok(), "known ids cost nothing");
        budget.missed(a, LOOKUP_BURST as usize - 1);
        assert!(budget.check(a).is_ok(), "one token left");
        budget.missed(a, 32);
        let wait = budget.check(a).unwrap_err();
        assert!(
            wait > LOOKUP_REFILL * 31 && wait <= LOOKUP_REFILL * 32,
            "the debt is waited off: {wait:?}"
        );
        assert!(budget.check(b).is_ok(), "another client has its own");
        budget.missed(ip("2001:db8:1:2::ffff"), LOOKUP_BURST as usize);
        assert!(budget.check(b).is_err(), "one /64 is one client");
        budget.missed(None, 1000);
        assert!(budget.check(None).is_ok(), "no address, no limit");
    }
}
