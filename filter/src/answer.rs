//! What the filter notes about an answer as it passes: its timing and its
//! token usage, for the usage record and the key's token limits. Nothing is
//! buffered: usage is read piece by piece, and a stream whose client did not
//! ask for usage loses its usage chunk on the way.

use modelgate_proto::usage::{UnaskedUsage, Usage, UsageReader, UsageRecord};

/// A stream's inter-token gaps kept for one record; a longer stream's later gaps are not reported.
const MAX_GAPS: usize = 4096;

/// How an answer's usage is found.
#[derive(Debug)]
enum Watch {
    /// Tokens are not counted here, or the answer is an error.
    Off,
    /// Read where it stands; the answer passes unchanged.
    Read(UsageReader),
    /// Read and removed: the gateway asked for it, not the client.
    Unasked(UnaskedUsage),
}

#[derive(Debug)]
pub struct Answer {
    watch: Watch,
    stream: bool,
    started_us: u64,
    first_piece_us: Option<u64>,
    last_piece_us: Option<u64>,
    /// The answer ended whole: its last piece has come.
    ended: bool,
    gaps_us: Vec<u64>,
}

impl Answer {
    /// An answer to a request that began at `started_us`; `count_tokens` where
    /// its usage matters, `unasked` where the client did not ask for a stream's usage.
    pub fn new(started_us: u64, stream: bool, count_tokens: bool, unasked: bool) -> Self {
        let watch = match (count_tokens, unasked) {
            (false, _) => Watch::Off,
            (true, false) => Watch::Read(UsageReader::default()),
            (true, true) => Watch::Unasked(UnaskedUsage::default()),
        };
        Answer {
            watch,
            stream,
            started_us,
            first_piece_us: None,
            last_piece_us: None,
            ended: false,
            gaps_us: Vec::new(),
        }
    }

    /// An error answer has no usage to read, and is passed on as it is rewritten.
    pub fn failed(&mut self) {
        self.watch = Watch::Off;
    }

    /// True when the answer's bytes must be looked at.
    pub fn reads_body(&self) -> bool {
        !matches!(self.watch, Watch::Off)
    }

    /// Notes a piece of the answer that arrived at `now_us()`, asked only of a
    /// piece with bytes (the clock is a host call). `Some(bytes)` when the
    /// piece must be replaced by those bytes before it goes on.
    pub fn on_piece(&mut self, now_us: impl FnOnce() -> u64, piece: &[u8], last: bool) -> Option<Vec<u8>> {
        if !piece.is_empty() {
            let now_us = now_us();
            self.first_piece_us.get_or_insert(now_us);
            if let Some(previous) = self.last_piece_us.replace(now_us) {
                if self.stream && self.gaps_us.len() < MAX_GAPS {
                    self.gaps_us.push(now_us.saturating_sub(previous));
                }
            }
        }
        self.ended |= last;
        match &mut self.watch {
            Watch::Off => None,
            Watch::Read(reader) => {
                reader.feed(piece);
                None
            }
            Watch::Unasked(unasked) => {
                let passed = unasked.pass(piece, last);
                (passed != piece).then_some(passed)
            }
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match &self.watch {
            Watch::Off => None,
            Watch::Read(reader) => reader.usage(),
            Watch::Unasked(unasked) => unasked.usage(),
        }
    }

    /// When the answer's last bytes came, if it ended whole and they were
    /// timed: the request's end, without another read of the clock.
    pub fn ended_us(&self) -> Option<u64> {
        self.last_piece_us.filter(|_| self.ended)
    }

    /// The record of this answer, ended at `now_us`, with the timing filled in.
    pub fn record(&mut self, now_us: u64) -> UsageRecord {
        UsageRecord {
            at_ms: now_us / 1000,
            stream: self.stream,
            usage: self.usage(),
            latency_us: now_us.saturating_sub(self.started_us),
            ttft_us: self.first_piece_us.map(|t| t.saturating_sub(self.started_us)),
            itl_us: std::mem::take(&mut self.gaps_us),
            ..UsageRecord::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n";
    const USAGE_CHUNK: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";

    #[test]
    fn a_stream_is_timed_chunk_by_chunk_and_its_unasked_usage_removed() {
        let mut answer = Answer::new(1_000, true, true, true);
        assert!(answer.reads_body());
        let first = answer.on_piece(|| 5_000, CHUNK, false).unwrap();
        assert_eq!(first, b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        answer.on_piece(|| 7_500, CHUNK, false);
        assert_eq!(answer.on_piece(|| 8_000, USAGE_CHUNK, false), Some(Vec::new()));
        assert_eq!(answer.ended_us(), None, "not yet ended");
        assert_eq!(answer.on_piece(|| 8_100, b"data: [DONE]\n\n", true), None, "an unchanged piece is left alone");
        assert_eq!(answer.ended_us(), Some(8_100), "ended with its last bytes");
        let record = answer.record(9_000);
        assert_eq!(record.usage, Some(Usage { prompt_tokens: 3, completion_tokens: 2 }));
        assert_eq!((record.latency_us, record.ttft_us), (8_000, Some(4_000)));
        assert_eq!(record.itl_us, [2_500, 500, 100]);
    }

    #[test]
    fn an_answer_ends_when_its_last_bytes_came_even_if_its_end_has_none() {
        let mut answer = Answer::new(0, false, true, false);
        answer.on_piece(|| 10, b"{}", false);
        answer.on_piece(|| panic!("an empty piece is not timed"), b"", true);
        assert_eq!(answer.ended_us(), Some(10));
        let mut empty = Answer::new(0, false, true, false);
        empty.on_piece(|| panic!("an empty piece is not timed"), b"", true);
        assert_eq!(empty.ended_us(), None, "no bytes came: the clock says when it ended");
    }

    #[test]
    fn a_whole_answer_passes_unchanged_and_an_error_is_not_read() {
        let mut answer = Answer::new(0, false, true, false);
        assert_eq!(answer.on_piece(|| 10, br#"{"usage":{"prompt_tokens":4}}"#, true), None);
        let record = answer.record(20);
        assert_eq!(record.usage, Some(Usage { prompt_tokens: 4, completion_tokens: 0 }));
        assert!(record.itl_us.is_empty());
        let mut failed = Answer::new(0, false, true, false);
        failed.failed();
        assert!(!failed.reads_body());
        assert_eq!(failed.on_piece(|| 10, br#"{"usage":{"prompt_tokens":4}}"#, true), None);
        assert_eq!(failed.usage(), None);
    }
}
