//! Admission limits: how many event streams may be open at once (in all, and per client address),
//! how fast one address may guess admin tokens, which address a request really comes from, and
//! the process's open-file limit the stream cap depends on.
//!
//! Every open stream holds a [`StreamPermit`]; dropping it (however the stream ends) gives the
//! place back, so the counts cannot drift the way a periodic sweep could.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use ipnet::IpNet;

/// File descriptors kept free for everything that is not a stream: the listener, database and
/// Redis connections, ordinary requests, log files.
const MIN_RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one and returns the soft limit now in force.
/// Every stream is a socket, so this limit is what really caps how many streams fit.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass, which lives on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            } else {
                log::warn!(
                    "cannot raise the open-file limit from {} to {}",
                    limit.rlim_cur,
                    limit.rlim_max
                );
            }
        }
    }
    limit.rlim_cur
}

/// The default stream cap for an open-file limit: a fortieth of it (at least 64) stays free for
/// the database, Redis, the listener and files: 19,500 streams at a limit of 20,000.
pub fn default_max_streams(open_file_limit: u64) -> usize {
    let reserved = (open_file_limit / 40).max(MIN_RESERVED_FDS);
    usize::try_from(open_file_limit.saturating_sub(reserved).max(1)).unwrap_or(usize::MAX)
}

/// Peers whose `X-Forwarded-For` we believe (`HANDOFF_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses a comma- or space-separated list of IPs and CIDRs, e.g. `127.0.0.1, 10.0.0.0/8`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        raw.split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Whether the request's TCP peer is one of ours, so its forwarding headers can be believed.
    pub fn trusts_peer(&self, req: &HttpRequest) -> bool {
        req.peer_addr().is_some_and(|peer| self.contains(peer.ip()))
    }

    /// The address a request comes from: the TCP peer, unless the peer is a trusted proxy; then
    /// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries further
    /// left were written by the client and prove nothing). `None` only without a TCP peer.
    pub fn client_addr(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        if !self.contains(peer) {
            return Some(peer);
        }
        let forwarded: Vec<&str> = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in forwarded.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.contains(ip) => client = ip,
                Ok(ip) => return Some(ip),
                // Garbage from the client side of the chain: keep the last hop we could trust.
                Err(_) => break,
            }
        }
        Some(client)
    }
}

/// Why a stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this server has {0} event streams open, its limit; try again shortly")]
    Full(usize),
    #[error(
        "this address (for IPv6, its /64) has {0} event streams open, its limit; close some first"
    )]
    ClientFull(usize),
}

/// What a per-client limit counts as one client: an IPv4 address, or an IPv6 /64. A home or a
/// server is given at least a /64 and may use any address in it, so counting single IPv6
/// addresses would let one client step around every per-client limit for free. What still gets
/// through: a home given a /56 or /48 has that many /64s to step through; and where a provider
/// puts several customers in one /64, they share its limits. IPv4-mapped IPv6 addresses count as
/// the IPv4 address they carry.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// The stream caps (`HANDOFF_MAX_STREAMS`, `HANDOFF_MAX_STREAMS_PER_CLIENT`) and the current counts.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_total: usize,
    max_per_client: Option<usize>,
    /// One lock for both counts, so admission is a single consistent decision. A std `Mutex`:
    /// never held across an `.await`, and each critical section is a counter update.
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted stream's place; dropping it frees the place.
#[derive(Debug)]
pub struct StreamPermit {
    inner: Arc<Inner>,
    client: Option<IpAddr>,
}

impl StreamLimits {
    pub fn new(max_total: usize, max_per_client: Option<usize>) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_total,
                max_per_client,
                counts: Mutex::default(),
            }),
        }
    }

    pub fn max_total(&self) -> usize {
        self.inner.max_total
    }

    /// Takes a place for a stream from `client`, or says which limit is reached.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<StreamPermit, Refusal> {
        let mut counts = self.inner.lock();
        if counts.total >= self.inner.max_total {
            return Err(Refusal::Full(self.inner.max_total));
        }
        let client = match (self.inner.max_per_client, client) {
            (Some(max), Some(ip)) => {
                let ip = client_key(ip);
                let n = counts.per_client.entry(ip).or_default();
                if *n >= max {
                    return Err(Refusal::ClientFull(max));
                }
                *n += 1;
                Some(ip)
            }
            _ => None,
        };
        counts.total += 1;
        Ok(StreamPermit {
            inner: Arc::clone(&self.inner),
            client,
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every update is complete before the lock is released, so a poisoned lock holds valid counts.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.inner.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.client
            && let Some(n) = counts.per_client.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&ip);
            }
        }
    }
}

/// Wrong admin logins an address may make before it has to wait.
const FREE_LOGIN_FAILURES: u32 = 5;
/// The first wait; each further failure doubles it, up to [`MAX_LOGIN_WAIT`].
const FIRST_LOGIN_WAIT: Duration = Duration::from_secs(1);
const MAX_LOGIN_WAIT: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most; beyond it, those no longer waiting are forgotten first.
const MAX_REMEMBERED_ADDRESSES: usize = 10_000;

/// Slows down token guessing on `/admin/login`, per client address: after
/// [`FREE_LOGIN_FAILURES`] wrong tokens, each attempt must wait a doubling time; a right token
/// clears the address's record.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    /// A std `Mutex`: never held across an `.await`; each critical section is one map update.
    failures: Mutex<HashMap<IpAddr, LoginFailures>>,
}

#[derive(Debug, Clone, Copy)]
struct LoginFailures {
    count: u32,
    blocked_until: Option<Instant>,
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, LoginFailures>> {
        // Each update is a single insert or remove: a poisoned map is still consistent.
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err(wait)` while `client` must wait before its next attempt.
    pub fn check(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let Some(ip) = client.map(client_key) else {
            return Ok(());
        };
        let now = Instant::now();
        match self.lock().get(&ip).and_then(|f| f.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a wrong token from `client`; returns how long it must now wait, if at all.
    pub fn failed(&self, client: Option<IpAddr>) -> Option<Duration> {
        let ip = client_key(client?);
        let now = Instant::now();
        let mut failures = self.lock();
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
        let entry = failures.entry(ip).or_insert(LoginFailures {
            count: 0,
            blocked_until: None,
        });
        entry.count = entry.count.saturating_add(1);
        let over = entry.count.checked_sub(FREE_LOGIN_FAILURES)?;
        let wait = FIRST_LOGIN_WAIT
            .saturating_mul(2u32.saturating_pow(over.min(20)))
            .min(MAX_LOGIN_WAIT);
        entry.blocked_until = Some(now + wait);
        Some(wait)
    }

    /// A right token: `client` starts afresh.
    pub fn succeeded(&self, client: Option<IpAddr>) {
        if let Some(ip) = client {
            self.lock().remove(&client_key(ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn the_login_record_never_grows_past_its_cap_even_when_everyone_waits() {
        let throttle = LoginThrottle::default();
        let blocked = |n: u32| Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
        for n in 0..=u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap() {
            for _ in 0..=FREE_LOGIN_FAILURES {
                throttle.failed(blocked(n));
            }
        }
        assert_eq!(throttle.lock().len(), MAX_REMEMBERED_ADDRESSES);
        assert!(
            throttle
                .check(blocked(u32::try_from(MAX_REMEMBERED_ADDRESSES).unwrap()))
                .is_err()
        );
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

        let throttle = LoginThrottle::default();
        for n in 0..=FREE_LOGIN_FAILURES {
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

    #[test]
    fn the_total_cap_refuses_the_next_stream_and_a_drop_frees_a_place() {
        let limits = StreamLimits::new(2, None);
        let a = limits.admit(ip("10.0.0.1")).unwrap();
        let _b = limits.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(limits.admit(ip("10.0.0.3")).unwrap_err(), Refusal::Full(2));
        drop(a);
        assert!(limits.admit(ip("10.0.0.3")).is_ok());
    }

    #[test]
    fn the_per_client_cap_counts_each_address_apart() {
        let limits = StreamLimits::new(100, Some(1));
        let a = limits.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limits.admit(ip("10.0.0.1")).unwrap_err(),
            Refusal::ClientFull(1)
        );
        let _b = limits.admit(ip("10.0.0.2")).unwrap();
        drop(a);
        assert!(limits.admit(ip("10.0.0.1")).is_ok());
        assert!(limits.inner.lock().per_client.len() <= 2);
    }

    #[test]
    fn login_failures_beyond_five_wait_a_doubling_time_and_a_success_clears_them() {
        let throttle = LoginThrottle::default();
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
        assert_eq!(throttle.failed(a), Some(MAX_LOGIN_WAIT));
        throttle.succeeded(a);
        assert!(throttle.check(a).is_ok());
    }

    #[test]
    fn the_default_cap_leaves_room_below_the_open_file_limit() {
        assert_eq!(default_max_streams(20_000), 19_500);
        assert_eq!(default_max_streams(256), 192);
        assert_eq!(default_max_streams(10), 1);
    }

    #[test]
    fn trusted_proxies_parse_ips_and_cidrs_and_name_the_bad_entry() {
        let t = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8 ::1").unwrap();
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
        assert!(
            TrustedProxies::parse("10.0.0.0/99")
                .unwrap_err()
                .contains("10.0.0.0/99")
        );
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_peer() {
        let trusted = TrustedProxies::parse("127.0.0.1").unwrap();
        let from = |peer: &str, xff: &str| {
            let req = TestRequest::default()
                .peer_addr(peer.parse().unwrap())
                .insert_header(("X-Forwarded-For", xff))
                .to_http_request();
            trusted.client_addr(&req)
        };
        assert_eq!(from("127.0.0.1:1", "203.0.113.9"), ip("203.0.113.9"));
        // The client wrote the left entry itself; the proxy appended the real one.
        assert_eq!(
            from("127.0.0.1:1", "1.1.1.1, 203.0.113.9"),
            ip("203.0.113.9")
        );
        assert_eq!(from("198.51.100.7:1", "203.0.113.9"), ip("198.51.100.7"));
        assert_eq!(from("127.0.0.1:1", "garbage"), ip("127.0.0.1"));
    }
}
