//! Admission limits, one topic per child: the open-file limit the stream cap depends on
//! (`open_files`), which address a request comes from (`client`), the stream caps and a stream's
//! latest end (`streams`),
//! the throttle on guessing the API token (`throttle`), the demo jobs one address may start
//! (`demo_jobs`) and the unknown job ids it may ask about (`lookups`), the last two token
//! buckets (`buckets`).

mod buckets;
mod client;
mod demo_jobs;
mod lookups;
mod open_files;
mod streams;
mod throttle;

pub use client::{TrustedProxies, client_key};
pub use demo_jobs::{DEMO_BURST, DEMO_REFILL, DemoJobLimit};
pub use lookups::{LOOKUP_BURST, LOOKUP_REFILL, LookupBudget};
pub use open_files::{default_max_streams, raise_open_file_limit};
pub use streams::{Refusal, StreamEnds, StreamLimits, StreamPermit};
pub use throttle::GuessThrottle;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// An address for the tests of every topic.
    pub(super) fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64_and_a_mapped_ipv4_is_its_ipv4() {
        let limits = StreamLimits::new(100, Some(1));
        let _a = limits.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            limits
                .admit(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
                .unwrap_err(),
            Refusal::ClientFull(1),
            "another address in the same /64 is the same client"
        );
        assert!(
            limits.admit(ip("2001:db8:1:3::1")).is_ok(),
            "the next /64 is not"
        );
        let _b = limits.admit(ip("192.0.2.7")).unwrap();
        assert_eq!(
            limits.admit(ip("::ffff:192.0.2.7")).unwrap_err(),
            Refusal::ClientFull(1)
        );

        let throttle = GuessThrottle::default();
        for n in 0..=throttle::FREE_GUESSES {
            throttle.failed(ip(&format!("2001:db8:1:2::{:x}", n + 1)));
        }
        assert!(
            throttle.check(ip("2001:db8:1:2::abcd")).is_err(),
            "guesses from one /64 add up, whichever addresses they come from"
        );
        assert!(throttle.check(ip("2001:db8:1:3::1")).is_ok());
        throttle.succeeded(ip("2001:db8:1:2::99"));
        assert!(throttle.check(ip("2001:db8:1:2::abcd")).is_ok());
    }
}
