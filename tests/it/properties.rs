//! Properties of the parsers that face the internet: the job id, the moveUrl rule and the API
//! body. Whatever the input, they never panic, and nothing the moveUrl rule accepts leaves the
//! origin when a browser resolves it (the `url` crate implements the same WHATWG parser).

use handoff::domain::{JOB_ID_LEN, JobId, MoveUrl};
use handoff::routes::api::move_url_from;
use proptest::prelude::*;
use url::Url;

const ORIGIN: &str = "http://handoff.test/jobs/page-a";

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

    #[test]
    fn a_job_id_is_exactly_twenty_two_url_safe_characters(raw in prop_oneof!["[A-Za-z0-9_-]{20,24}", any::<String>()]) {
        let well_formed = raw.len() == JOB_ID_LEN
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        prop_assert_eq!(JobId::parse(&raw).is_ok(), well_formed, "{:?}", raw);
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
