//! Which address a request really comes from, behind trusted proxies, and what counts as one
//! client for the per-client limits.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// Peers whose `X-Forwarded-For` we believe (`HANDOFF_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// As `HANDOFF_TRUSTED_PROXIES` takes it: comma-separated, or `none`.
impl std::fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&nets.join(", "))
    }
}

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

    /// Whether `peer` (a request's TCP peer) is one of ours, so its forwarding headers can be
    /// believed.
    pub fn trusts(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| self.contains(ip))
    }

    /// The address a request comes from: its TCP `peer`, unless the peer is a trusted proxy;
    /// then the right-most entry of its `X-Forwarded-For` headers (`forwarded_for`, in order)
    /// that is not itself a trusted proxy (entries further left were written by the client and
    /// prove nothing). `None` only without a TCP peer.
    pub fn client_addr<'a>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let peer = peer?;
        if !self.contains(peer) {
            return Some(peer);
        }
        let forwarded: Vec<&str> = forwarded_for
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

/// What a per-client limit counts as one client: an IPv4 address, or an IPv6 /64. A home or a
/// server is given at least a /64 and may use any address in it, so counting single IPv6
/// addresses would let one client step around every per-client limit for free. What still gets
/// through: a home given a /56 or /48 has that many /64s to step through; and where a provider
/// puts several customers in one /64, they share its limits. IPv4-mapped IPv6 addresses count as
/// the IPv4 address they carry.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::ip;

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
        let from = |peer: &str, xff: &str| trusted.client_addr(ip(peer), [xff].into_iter());
        assert_eq!(from("127.0.0.1", "203.0.113.9"), ip("203.0.113.9"));
        // The client wrote the left entry itself; the proxy appended the real one.
        assert_eq!(from("127.0.0.1", "1.1.1.1, 203.0.113.9"), ip("203.0.113.9"));
        assert_eq!(from("198.51.100.7", "203.0.113.9"), ip("198.51.100.7"));
        assert_eq!(from("127.0.0.1", "garbage"), ip("127.0.0.1"));
        assert_eq!(
            trusted.client_addr(ip("127.0.0.1"), ["1.1.1.1", "203.0.113.9"].into_iter()),
            ip("203.0.113.9"),
            "several headers read as one list, in order"
        );
    }
}
