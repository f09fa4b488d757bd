//! The process's open-file limit, which is what really caps how many streams fit: every stream
//! is a socket.

/// File descriptors kept free for everything that is not a stream: the listener, database and
/// Redis connections, ordinary requests, log files.
const MIN_RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one and returns the soft limit now in force.
pub fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            log::warn!("cannot raise the open-file limit: {err}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The default stream cap for an open-file limit: a fortieth of it (at least 64) stays free for
/// the database, Redis, the listener and files: 19,500 streams at a limit of 20,000.
pub fn default_max_streams(open_file_limit: u64) -> usize {
    let reserved = (open_file_limit / 40).max(MIN_RESERVED_FDS);
    usize::try_from(open_file_limit.saturating_sub(reserved).max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_room_below_the_open_file_limit() {
        assert_eq!(default_max_streams(20_000), 19_500);
        assert_eq!(default_max_streams(256), 192);
        assert_eq!(default_max_streams(10), 1);
    }
}
