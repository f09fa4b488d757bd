//! Properties of the parsers that face the internet: the job id, the moveUrl rule and the API
//! body. Whatever the input, they never panic, and nothing the moveUrl rule accepts leaves the
//! origin when a browser resolves it (the `url` crate implements the same WHATWG parser).

use handoff::domain::{JOB_ID_LEN, JobId, MoveUrl};
use handoff::routes::api::move_url_from;
use proptest::prelude::*;
use url::Url;

const ORIGIN: &str = "http://handoff.test/jobs/page-a";

/// Whether `c` is in the URL-safe base64 alphabet (RFC 4648, section 5).
fn url_safe(c: char) -> bool {
    base64::alphabet::URL_SAFE.as_str().contains(c)
}

/// Asserts that `raw`, resolved as a link on page A, stays on Handoff's origin.
fn stays_on_origin(raw: &str) -> Result<(), TestCaseError> {
    let base = Url::parse(ORIGIN).unwrap();
    let resolved = base
        .join(raw)
        .map_err(|e| TestCaseError::fail(format!("{raw:?}: {e}")))?;
    prop_assert_eq!(
        resolved.origin(),
        base.origin(),
        "{:?} resolved to {}",
        raw,
        resolved
    );
    Ok(())
}

/// Strings shaped like the tricks used for open redirects: scheme-relative, backslashes,
/// encoded slashes, control characters and whitespace a browser strips, userinfo, schemes.
fn redirect_tricks() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("\\".to_owned()),
        Just("%2f".to_owned()),
        Just("%5c".to_owned()),
        Just("%00".to_owned()),
        Just("\t".to_owned()),
        Just("\n".to_owned()),
        Just(" ".to_owned()),
        Just("\u{0}".to_owned()),
        Just("\u{3000}".to_owned()),
        Just("\u{feff}".to_owned()),
        Just("\u{2215}".to_owned()),
        Just(":".to_owned()),
        Just("@".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("?".to_owned()),
        Just("#".to_owned()),
        Just("evil.example".to_owned()),
        Just("http:".to_owned()),
        Just("https:".to_owned()),
        Just("javascript:".to_owned()),
        Just("data:".to_owned()),
        "[a-z0-9=&]{0,6}",
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn accepted_move_urls_never_leave_the_origin(raw in prop_oneof![redirect_tricks(), "\\PC{0,64}", any::<String>()]) {
        if let Ok(url) = MoveUrl::parse(&raw) {
            prop_assert_eq!(url.as_str(), raw.as_str(), "accepted as given, not rewritten");
            stays_on_origin(url.as_str())?;
        }
    }

    /// The oracle is the construction of each input, and the alphabet is base64url's as the
    /// `base64` crate spells it, not `JobId::parse`'s own test.
    #[test]
    fn a_job_id_is_exactly_twenty_two_url_safe_characters(
        id in "[A-Za-z0-9_-]{22}",
        cut in 0..JOB_ID_LEN,
        more in "[A-Za-z0-9_-]{1,40}",
        at in 0..JOB_ID_LEN,
        intruder in any::<char>().prop_filter("outside the alphabet", |c| !url_safe(*c)),
        anything in any::<String>(),
    ) {
        prop_assert!(id.chars().all(url_safe));
        let parsed = JobId::parse(&id).map(|id| id.as_str().to_owned());
        prop_assert_eq!(parsed, Ok(id.clone()), "22 URL-safe characters are an id, as given");
        prop_assert!(JobId::parse(&id[..cut]).is_err(), "{} is too short", &id[..cut]);
        let longer = format!("{id}{more}");
        prop_assert!(JobId::parse(&longer).is_err(), "{} is too long", longer);
        let mut chars: Vec<char> = id.chars().collect();
        chars[at] = intruder;
        let spoiled: String = chars.into_iter().collect();
        prop_assert!(JobId::parse(&spoiled).is_err(), "{:?} has {:?}", spoiled, intruder);
        if let Ok(accepted) = JobId::parse(&anything) {
            prop_assert_eq!(accepted.as_str(), anything.as_str());
            prop_assert!(anything.chars().count() == JOB_ID_LEN && anything.chars().all(url_safe));
        }
    }

    #[test]
    fn the_api_body_parser_never_panics_and_keeps_to_the_rule(
        body in prop_oneof![
            any::<Vec<u8>>(),
            redirect_tricks().prop_map(|u| serde_json::json!({ "moveUrl": u }).to_string().into_bytes()),
            "[\\[\\]{}\":,a-zA-Z0-9 ]{0,64}".prop_map(String::into_bytes),
        ]
    ) {
        if let Ok(Some(url)) = move_url_from(&body) {
            stays_on_origin(url.as_str())?;
        }
    }
}

#[test]
fn generated_ids_always_parse() {
    for _ in 0..10_000 {
        let id = JobId::generate();
        assert_eq!(JobId::parse(id.as_str()), Ok(id));
    }
}
