//! `JobId::parse` accepts exactly 22 URL-safe characters, and never panics.
#![no_main]

use handoff::domain::{JOB_ID_LEN, JobId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    let well_formed = raw.len() == JOB_ID_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match JobId::parse(raw) {
        Ok(id) => assert!(well_formed && id.as_str() == raw, "{raw:?}"),
        Err(_) => assert!(!well_formed, "{raw:?}"),
    }
});
