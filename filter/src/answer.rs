//! What the filter notes about an answer as it passes: its timing and its
//! token usage, for the usage record and the key's token limits. Nothing is
//! buffered: usage is read piece by piece, and a stream whose client did not
//! ask for usage loses its usage chunk on the way; or, for a stream through
//! the stream guard over HTTP/2, the guard does both and hands the usage and
//! the timings over in one trailer, and no piece is read here.

use modelgate_proto::usage::{Usage, UsageRecord, UsageWatch};
use modelgate_proto::usage_trailer::{keep_gap, UsageTrailer};

/// How an answer's usage is found.
#[derive(Debug)]
enum Watch {
    /// Tokens are not counted here, or the answer is an error.
    Off,
    /// Read here, piece by piece (unless the stream guard, asked to, says it
    /// reads it and gives it in a trailer at the stream's end).
    Here(UsageWatch),
    /// Read by the stream guard, which gives it in a trailer at the stream's end.
    Trailer(Option<Usage>),
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
    /// The stream guard was asked to read the usage: it may say it does.
    asked_guard: bool,
    gaps_us: Vec<u64>,
}

impl Answer {
    /// An answer to a request that began at `started_us`; `count_tokens` where
    /// its usage matters, `unasked` where the client did not ask for a stream's usage.
    pub fn new(started_us: u64, stream: bool, count_tokens: bool, unasked: bool) -> Self {
        let watch = if count_tokens { Watch::Here(UsageWatch::new(unasked)) } else { Watch::Off };
        Answer {
            watch,
            stream,
            started_us,
            first_piece_us: None,
            last_piece_us: None,
            ended: false,
            asked_guard: false,
            gaps_us: Vec::new(),
        }
    }

    /// A stream through the stream guard whose tokens are counted: the guard
    /// is asked to read its usage, with the value this returns, if any.
    pub fn ask_guard(&mut self) -> Option<&'static str> {
        let Watch::Here(watch) = &self.watch else { return None };
        self.asked_guard = self.stream;
        self.stream.then(|| watch.name())
    }

    /// True when the stream guard was asked for the usage trailer and has not answered yet.
    pub fn asked_guard(&self) -> bool {
        self.asked_guard && matches!(self.watch, Watch::Here(_))
    }

    /// The stream guard said it reads the usage: the stream's pieces are not read here.
    pub fn from_trailer(&mut self) {
        if self.asked_guard() {
            self.watch = Watch::Trailer(None);
        }
    }

    /// True when the stream guard gives the usage in a trailer.
    pub fn awaits_trailer(&self) -> bool {
        matches!(self.watch, Watch::Trailer(_))
    }

    /// A piece of a stream whose usage comes in a trailer: only the first is timed.
    pub fn on_unread_piece(&mut self, now_us: impl FnOnce() -> u64) {
        if self.first_piece_us.is_none() {
            self.first_piece_us = Some(now_us());
        }
    }

    /// The stream guard's usage trailer ([`UsageTrailer`]), come at `now_us`:
    /// the answer ended whole with it.
    pub fn on_trailer(&mut self, value: &[u8], now_us: u64) {
        let Watch::Trailer(usage) = &mut self.watch else { return };
        let trailer = UsageTrailer::parse(value);
        *usage = trailer.usage;
        self.gaps_us = trailer.gaps_us;
        self.ended = true;
        self.last_piece_us = Some(now_us);
    }

    /// An error answer has no usage to read, and is passed on as it is rewritten.
    pub fn failed(&mut self) {
        self.watch = Watch::Off;
    }

    /// True when the answer's bytes must be looked at.
    pub fn reads_body(&self) -> bool {
        !matches!(self.watch, Watch::Off | Watch::Trailer(_))
    }

    /// Notes a piece of the answer that arrived at `now_us()`, asked only of a
    /// piece with bytes (the clock is a host call). `Some(bytes)` when the
    /// piece must be replaced by those bytes before it goes on.
    pub fn on_piece(&mut self, now_us: impl FnOnce() -> u64, piece: &[u8], last: bool) -> Option<Vec<u8>> {
        if !piece.is_empty() {
            let now_us = now_us();
            self.first_piece_us.get_or_insert(now_us);
            if let Some(previous) = self.last_piece_us.replace(now_us) {
                if self.stream {
                    keep_gap(&mut self.gaps_us, now_us.saturating_sub(previous));
                }
            }
        }
        self.ended |= last;
        match &mut self.watch {
            Watch::Off | Watch::Trailer(_) => None,
            Watch::Here(watch) => watch.pass(piece, last),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match &self.watch {
            Watch::Off => None,
            Watch::Trailer(usage) => *usage,
            Watch::Here(watch) => watch.usage(),
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
    fn a_guarded_streams_usage_comes_in_the_guards_trailer_once_the_guard_says_it_sends_one() {
        let mut answer = Answer::new(0, true, true, true);
        assert_eq!(answer.ask_guard(), Some("unasked"));
        assert!(answer.asked_guard() && answer.reads_body(), "read here until the guard answers");
        answer.from_trailer();
        assert!(!answer.reads_body() && answer.awaits_trailer());
        assert_eq!(answer.on_piece(|| panic!("no piece is read"), b"", false), None);
        answer.on_unread_piece(|| 40);
        answer.on_unread_piece(|| panic!("only the first piece is timed"));
        answer.on_trailer(b"12,34 20 30", 100);
        assert_eq!(answer.usage(), Some(Usage { prompt_tokens: 12, completion_tokens: 34 }));
        assert_eq!(answer.ended_us(), Some(100));
        let record = answer.record(120);
        assert_eq!((record.ttft_us, record.itl_us), (Some(40), vec![20, 30]));

        let mut none = Answer::new(0, true, true, false);
        assert_eq!(none.ask_guard(), Some("read"));
        none.from_trailer();
        none.on_trailer(b"none", 10);
        assert_eq!(none.usage(), None);

        // A guard that does not say it sends the trailer (an older one): the stream is read here.
        let mut older = Answer::new(0, true, true, false);
        older.ask_guard();
        older.on_piece(|| 5, USAGE_CHUNK, true);
        assert_eq!(older.usage(), Some(Usage { prompt_tokens: 3, completion_tokens: 2 }));

        let mut off = Answer::new(0, true, false, false);
        assert_eq!(off.ask_guard(), None, "tokens not counted: nothing to ask the guard for");
        let mut whole = Answer::new(0, false, true, false);
        assert_eq!(whole.ask_guard(), None, "a whole answer is read here");
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
