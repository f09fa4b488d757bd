//! The stream caps: how many event streams may be open at once, in all and per client; and how
//! long one may hold its place ([`StreamEnds`]).
//!
//! Every open stream holds a [`StreamPermit`]; dropping it (however the stream ends) gives the
//! place back, so the counts cannot drift the way a periodic sweep could.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::client::client_key;

/// When an event stream ends at the latest: its timeout. Its route leaves it in the request's
/// extensions for the connection (`startup`): once the client stops reading and the socket is
/// full, actix-http stops polling the stream, whose own timer then cannot end it, so the
/// connection closes at this instant instead, and the stream's place goes with it.
#[derive(Debug, Clone, Copy)]
pub struct StreamEnds(pub Instant);

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

/// The stream caps (`HANDOFF_MAX_STREAMS`, `HANDOFF_MAX_STREAMS_PER_CLIENT`) and the current counts.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max_total: usize,
    max_per_client: Option<usize>,
    /// One lock for both counts, so admission is a single consistent decision.
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
        let mut counts = self.inner.counts.lock();
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

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.inner.counts.lock();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::tests::ip;

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
        assert!(limits.inner.counts.lock().per_client.len() <= 2);
    }
}
