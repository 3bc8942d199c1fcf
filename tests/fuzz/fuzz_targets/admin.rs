//! The admin port's parsers: the filter's NDJSON usage records, the usage
//! report's query string, and the shared limits' spend request (and the
//! filter's reading of the verdicts that come back).
//!
//! Invariants: each non-blank line is a record, a tally or a rejection, only
//! one of them; an accepted record's cost is a price; what parses survives a round
//! trip through its own serialisation; a report window never ends before it
//! starts; a refusal is an OpenAI error with a 400.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelgate_admin::routes::{parse_records, parse_window};
use modelgate_proto::limits::{SpendRequest, SpendResponse};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            let parsed = parse_records(data);
            let lines = data.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count();
            assert_eq!((parsed.records.len() + parsed.tallies.len()) as u64 + parsed.rejected, lines as u64);
            assert_eq!(parsed.first_error.is_some(), parsed.rejected > 0);
            for record in &parsed.records {
                assert!(record.cost_usd.is_none_or(|c| c.is_finite() && c >= 0.0), "{record:?}");
                let again = serde_json::to_vec(record).expect("a record serialises");
                let reparsed = parse_records(&again);
                assert_eq!(reparsed.records.len(), 1, "a record survives its round trip: {record:?}");
            }
            for tally in &parsed.tallies {
                let again = serde_json::to_vec(tally).expect("a tally serialises");
                assert_eq!(parse_records(&again).tallies, [tally.clone()], "a tally survives its round trip");
            }
        }
        1 => {
            let Ok(query) = std::str::from_utf8(data) else { return };
            match parse_window(Some(query), 1_700_000_000) {
                Ok((start, end)) => assert!(start <= end),
                Err(refusal) => {
                    assert_eq!(refusal.status, 400);
                    modelgate_fuzz::assert_envelope(&refusal.to_json());
                }
            }
        }
        _ => {
            if let Ok(request) = serde_json::from_slice::<SpendRequest>(data) {
                let again = serde_json::to_vec(&request).expect("a request serialises");
                assert_eq!(serde_json::from_slice::<SpendRequest>(&again).ok(), Some(request));
            }
            if let Ok(response) = serde_json::from_slice::<SpendResponse>(data) {
                let again = serde_json::to_vec(&response).expect("a response serialises");
                assert_eq!(serde_json::from_slice::<SpendResponse>(&again).ok(), Some(response));
            }
        }
    }
});
