//! The API body parser never panics, and a moveUrl it returns stays on the origin.
#![no_main]

use handoff::routes::api::move_url_from;
use libfuzzer_sys::fuzz_target;
use url::Url;

fuzz_target!(|body: &[u8]| {
    if let Ok(Some(target)) = move_url_from(body) {
        let base = Url::parse("http://handoff.test/jobs/page-a").unwrap();
        let resolved = base
            .join(target.as_str())
            .expect("an accepted moveUrl resolves");
        assert_eq!(resolved.origin(), base.origin(), "{body:?} -> {resolved}");
    }
});
