//! Lines of a JSONL object read as its bytes arrive: memory holds one line at
//! a time (at most [`MAX_LINE_BYTES`]), whatever the object's size.

use crate::blobs::BlobError;
use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use std::collections::VecDeque;

/// Longest line read; a longer one is refused (a batch's line, or a result segment's).
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// A line, numbered from 1, without its newline (nor a `\r` before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub number: u64,
    pub bytes: Bytes,
}

impl Line {
    /// Blank lines (a trailing newline's, or whitespace only) are not requests: they are skipped, uncounted.
    pub fn is_blank(&self) -> bool {
        self.bytes.iter().all(u8::is_ascii_whitespace)
    }
}

#[derive(Debug)]
pub enum ReadError {
    /// The line at this number is longer than [`MAX_LINE_BYTES`].
    TooLong(u64),
    Blob(BlobError),
}

/// Splits pieces of bytes into lines; pure, so it is tested on any cut of any input.
#[derive(Debug, Default)]
pub struct Splitter {
    pending: BytesMut,
    number: u64,
    /// Skipping the rest of a line found too long.
    overlong: bool,
}

impl Splitter {
    /// The lines `piece` completes. A line longer than `max` is reported once
    /// as [`ReadError::TooLong`] and its bytes are dropped.
    pub fn push(&mut self, piece: &[u8], max: usize) -> Vec<Result<Line, u64>> {
        let mut lines = Vec::new();
        let mut rest = piece;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(end);
            rest = &tail[1..];
            self.number += 1;
            if self.overlong || self.pending.len() + head.len() > max {
                if !self.overlong {
                    lines.push(Err(self.number));
                }
                self.overlong = false;
                self.pending.clear();
                continue;
            }
            self.pending.extend_from_slice(head);
            lines.push(Ok(self.take()));
        }
        if !self.overlong && self.pending.len() + rest.len() > max {
            self.overlong = true;
            self.pending.clear();
            lines.push(Err(self.number + 1));
        } else if !self.overlong {
            self.pending.extend_from_slice(rest);
        }
        lines
    }

    /// The last line, when the input does not end with a newline.
    pub fn finish(&mut self) -> Option<Line> {
        if self.overlong || self.pending.is_empty() {
            return None;
        }
        self.number += 1;
        Some(self.take())
    }

    fn take(&mut self) -> Line {
        let mut bytes = self.pending.split().freeze();
        if bytes.last() == Some(&b'\r') {
            bytes.truncate(bytes.len() - 1);
        }
        Line { number: self.number, bytes }
    }
}

/// The lines of an object's byte stream, as they arrive.
pub fn lines(
    pieces: BoxStream<'static, Result<Bytes, BlobError>>,
    max: usize,
) -> BoxStream<'static, Result<Line, ReadError>> {
    struct Reading {
        pieces: Option<BoxStream<'static, Result<Bytes, BlobError>>>,
        splitter: Splitter,
        ready: VecDeque<Result<Line, ReadError>>,
    }
    let reading = Reading { pieces: Some(pieces), splitter: Splitter::default(), ready: VecDeque::new() };
    futures_util::stream::unfold(reading, move |mut reading| async move {
        loop {
            if let Some(line) = reading.ready.pop_front() {
                return Some((line, reading));
            }
            let pieces = reading.pieces.as_mut()?;
            match pieces.next().await {
                Some(Ok(piece)) => {
                    let lines = reading.splitter.push(&piece, max);
                    reading.ready.extend(lines.into_iter().map(|line| line.map_err(ReadError::TooLong)));
                }
                Some(Err(e)) => {
                    reading.pieces = None;
                    return Some((Err(ReadError::Blob(e)), reading));
                }
                None => {
                    reading.pieces = None;
                    reading.ready.extend(reading.splitter.finish().map(Ok));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(input: &[u8], cuts: &[usize], max: usize) -> Vec<Result<(u64, Vec<u8>), u64>> {
        let mut splitter = Splitter::default();
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&input.len()]) {
            let cut = cut.clamp(at, input.len());
            out.extend(splitter.push(&input[at..cut], max));
            at = cut;
        }
        out.extend(splitter.finish().map(Ok));
        out.into_iter().map(|r| r.map(|l| (l.number, l.bytes.to_vec()))).collect()
    }

    #[test]
    fn lines_are_numbered_and_overlong_ones_reported_once() {
        assert_eq!(
            split(b"a\r\n\nbbbbbbbb\nc", &[1, 5, 7], 4),
            vec![Ok((1, b"a".to_vec())), Ok((2, b"".to_vec())), Err(3), Ok((4, b"c".to_vec()))]
        );
        assert_eq!(split(b"abcdef", &[], 4), vec![Err(1)]);
        assert_eq!(split(b"x\n", &[], 4), vec![Ok((1, b"x".to_vec()))]);
    }

    proptest! {
        #[test]
        fn any_cut_gives_the_same_lines(input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), Just(b'\r')], 0..64),
                                        cuts in proptest::collection::vec(0usize..64, 0..6), max in 1usize..8) {
            let mut sorted = cuts.clone();
            sorted.sort_unstable();
            prop_assert_eq!(split(&input, &sorted, max), split(&input, &[], max));
        }
    }
}
