//! A guarded stream's usage, handed by the stream guard to the filter in one
//! HTTP/2 trailer at the stream's end, so that the filter reads no piece of
//! the stream. The value: `<prompt_tokens>,<completion_tokens>`, or `none`
//! where the stream gave no usage, then the gaps between the stream's pieces
//! in microseconds, each after a space.

use crate::usage::Usage;

/// The most gaps one usage record keeps; a longer stream's later gaps are not reported.
pub const MAX_GAPS: usize = 4096;

/// The most bytes of gaps one trailer carries, well under Envoy's default limit
/// on a response's headers (60 KiB), which its trailers count against: a
/// trailer over it would reset the client's stream at its very end. 4,096
/// gaps of up to 7 digits (10 s) fit; longer gaps leave the last ones out.
pub const MAX_GAPS_BYTES: usize = 32 * 1024;

/// Keeps one more gap of a stream's, unless it already has [`MAX_GAPS`].
pub fn keep_gap(gaps_us: &mut Vec<u64>, gap_us: u64) {
    if gaps_us.len() < MAX_GAPS {
        gaps_us.push(gap_us);
    }
}

/// What the trailer says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsageTrailer {
    pub usage: Option<Usage>,
    pub gaps_us: Vec<u64>,
}

impl UsageTrailer {
    /// The trailer's value, its gaps cut at [`MAX_GAPS`] and [`MAX_GAPS_BYTES`].
    pub fn encode(usage: Option<Usage>, gaps_us: &[u64]) -> String {
        let mut value = match usage {
            Some(Usage { prompt_tokens, completion_tokens }) => format!("{prompt_tokens},{completion_tokens}"),
            None => "none".to_owned(),
        };
        let counts = value.len();
        let mut digits = itoa::Buffer::new();
        for gap in gaps_us.iter().take(MAX_GAPS) {
            let gap = digits.format(*gap);
            if value.len() - counts + 1 + gap.len() > MAX_GAPS_BYTES {
                break;
            }
            value.push(' ');
            value.push_str(gap);
        }
        value
    }

    /// Reads a trailer's value; what is not as [`Self::encode`] writes it counts as no usage, no gap.
    pub fn parse(value: &[u8]) -> UsageTrailer {
        let mut fields = value.split(|&b| b == b' ');
        let usage = fields.next().and_then(|counts| {
            let comma = counts.iter().position(|&b| b == b',')?;
            Some(Usage { prompt_tokens: number(&counts[..comma])?, completion_tokens: number(&counts[comma + 1..])? })
        });
        let gaps_us = fields.filter_map(number).take(MAX_GAPS).collect();
        UsageTrailer { usage, gaps_us }
    }
}

fn number(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_trailer_gives_the_counts_then_the_gaps() {
        let usage = Some(Usage { prompt_tokens: 12, completion_tokens: 34 });
        assert_eq!(UsageTrailer::encode(usage, &[20, 30]), "12,34 20 30");
        assert_eq!(UsageTrailer::parse(b"12,34 20 30"), UsageTrailer { usage, gaps_us: vec![20, 30] });
        assert_eq!(UsageTrailer::encode(None, &[]), "none");
        assert_eq!(UsageTrailer::parse(b"none"), UsageTrailer::default());
        assert_eq!(UsageTrailer::parse(b"1,x 5 y 6").gaps_us, vec![5, 6]);
    }

    #[test]
    fn a_long_streams_gaps_are_bounded_in_number_and_in_bytes() {
        let many = vec![7; MAX_GAPS + 10];
        assert_eq!(UsageTrailer::parse(UsageTrailer::encode(None, &many).as_bytes()).gaps_us.len(), MAX_GAPS);
        let long = vec![u64::MAX; MAX_GAPS];
        let value = UsageTrailer::encode(None, &long);
        assert!(value.len() <= "none".len() + MAX_GAPS_BYTES, "{}", value.len());
        assert!(UsageTrailer::parse(value.as_bytes()).gaps_us.len() > 1000);
    }

    proptest! {
        #[test]
        fn what_is_encoded_is_read_back(
            usage in proptest::option::of((any::<u64>(), any::<u64>())),
            gaps in proptest::collection::vec(0u64..10_000_000, 0..200),
        ) {
            let usage = usage.map(|(prompt_tokens, completion_tokens)| Usage { prompt_tokens, completion_tokens });
            let read = UsageTrailer::parse(UsageTrailer::encode(usage, &gaps).as_bytes());
            prop_assert_eq!(read, UsageTrailer { usage, gaps_us: gaps });
        }

        #[test]
        fn any_value_is_read_without_panicking(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let read = UsageTrailer::parse(&value);
            prop_assert!(read.gaps_us.len() <= MAX_GAPS);
        }
    }
}
