//! A deterministic, reversible stand-in for an engine's tokenizer. A token is
//! a word with the whitespace before it, and words longer than
//! [`MAX_WORD_BYTES`] are split, so English comes out at about 5 bytes a
//! token and a short prompt counts one token per word (what the gateway's
//! tests of usage expect). Every replica computes the same ids for the same
//! text, as replicas sharing a real tokenizer do, so prefix-cache blocks agree.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The longest run of non-space bytes in one token.
const MAX_WORD_BYTES: usize = 12;

/// Ids stay below this, as a real vocabulary's do (and JSON numbers stay exact).
const VOCAB_BITS: u32 = 31;

/// The pieces of `text`, in order; they join back into `text` exactly.
pub fn pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut word_bytes = 0;
    for (at, c) in text.char_indices() {
        let ends_piece = if c.is_whitespace() { word_bytes > 0 } else { word_bytes + c.len_utf8() > MAX_WORD_BYTES };
        if ends_piece {
            pieces.push(&text[start..at]);
            start = at;
            word_bytes = 0;
        }
        if !c.is_whitespace() {
            word_bytes += c.len_utf8();
        }
    }
    let rest = &text[start..];
    match pieces.last_mut() {
        // trailing whitespace joins the last word rather than counting as a token of its own
        Some(last) if word_bytes == 0 && !rest.is_empty() => {
            *last = &text[text.len() - last.len() - rest.len()..];
        }
        _ if !rest.is_empty() => pieces.push(rest),
        _ => {}
    }
    pieces
}

/// The id of one piece: a hash, the same in every process.
pub fn id(piece: &str) -> u32 {
    // FNV-1a: fixed across processes and Rust versions, unlike the std hasher
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in piece.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash >> (64 - VOCAB_BITS)) as u32
}

/// Token ids of `text`.
pub fn ids(text: &str) -> Vec<u32> {
    pieces(text).into_iter().map(id).collect()
}

/// Number of tokens in `text`.
pub fn count(text: &str) -> u32 {
    pieces(text).len() as u32
}

/// The ids handed out by `/tokenize`, so `/detokenize` can turn them back into text.
#[derive(Debug, Default)]
pub struct Vocabulary {
    pieces: Mutex<HashMap<u32, String>>,
}

impl Vocabulary {
    /// The process's vocabulary.
    pub fn global() -> &'static Vocabulary {
        static VOCABULARY: OnceLock<Vocabulary> = OnceLock::new();
        VOCABULARY.get_or_init(Vocabulary::default)
    }

    /// Tokenizes `text`, remembering each piece: the ids and their texts.
    pub fn tokenize(&self, text: &str) -> (Vec<u32>, Vec<String>) {
        let mut known = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        pieces(text)
            .into_iter()
            .map(|piece| {
                let id = id(piece);
                known.entry(id).or_insert_with(|| piece.to_string());
                (id, piece.to_string())
            })
            .unzip()
    }

    /// The text of `ids`, or the first id this process never handed out.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, u32> {
        let known = self.pieces.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().map(|id| known.get(id).map(String::as_str).ok_or(*id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_words_are_one_token_each() {
        assert_eq!(pieces("Be brief.  hello there\n"), ["Be", " brief.", "  hello", " there\n"]);
        assert_eq!(count("one two three"), 3);
        assert_eq!(pieces("extraordinarily"), ["extraordinar", "ily"]);
        assert_eq!(count(""), 0);
        assert_eq!(pieces("  "), ["  "]);
        assert_eq!(ids("a b a"), [id("a"), id(" b"), id(" a")]);
    }

    proptest! {
        #[test]
        fn detokenize_reverses_tokenize(text in "\\PC{0,200}|[a-z \\n]{0,200}") {
            prop_assert_eq!(pieces(&text).concat(), text.clone());
            let vocabulary = Vocabulary::default();
            let (ids, strs) = vocabulary.tokenize(&text);
            prop_assert_eq!(strs.concat(), text.clone());
            prop_assert_eq!(vocabulary.detokenize(&ids), Ok(text));
        }
    }
}
