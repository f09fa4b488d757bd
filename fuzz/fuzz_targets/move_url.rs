//! Nothing `MoveUrl::parse` accepts leaves the origin once a browser resolves it.
#![no_main]

use handoff::domain::MoveUrl;
use libfuzzer_sys::fuzz_target;
use url::Url;

fuzz_target!(|raw: &str| {
    if let Ok(target) = MoveUrl::parse(raw) {
        let base = Url::parse("http://handoff.test/jobs/page-a").unwrap();
        let resolved = base
            .join(target.as_str())
            .expect("an accepted moveUrl resolves");
        assert_eq!(resolved.origin(), base.origin(), "{raw:?} -> {resolved}");
    }
});
