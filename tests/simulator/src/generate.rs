//! Deterministic "generation": token counts, text and embeddings that depend
//! only on the request, so tests can predict them.

use serde_json::Value;
use std::hash::{Hash, Hasher};

const WORDS: &[&str] = &["This", "is", "a", "simulated", "reply", "from", "the", "backend"];

/// The `i`th generated token; tokens join into readable text.
pub fn token(i: u32) -> String {
    let word = WORDS[i as usize % WORDS.len()];
    if i == 0 {
        word.to_string()
    } else {
        format!(" {word}")
    }
}

/// Text of `n` tokens.
pub fn text(n: u32) -> String {
    (0..n).map(token).collect()
}

/// Prompt tokens, counted as whitespace-separated words (at least 1).
pub fn count_words(text: &str) -> u32 {
    text.split_whitespace().count().max(1) as u32
}

/// Prompt tokens of a chat request: the words of every text part of every message.
pub fn chat_prompt_tokens(messages: &[Value]) -> u32 {
    let mut words = 0;
    for message in messages {
        match &message["content"] {
            Value::String(s) => words += count_words(s),
            Value::Array(parts) => {
                for part in parts {
                    match part["text"].as_str() {
                        Some(t) => words += count_words(t),
                        // an image or audio part costs a fixed amount, as in real engines
                        None => words += 1,
                    }
                }
            }
            _ => {}
        }
    }
    words.max(1)
}

/// Tokens in a completions `prompt` or an embeddings `input` item: a string
/// counts its words, a token array its length.
pub fn item_tokens(item: &Value) -> u32 {
    match item {
        Value::String(s) => count_words(s),
        Value::Array(tokens) => tokens.len().max(1) as u32,
        _ => 1,
    }
}

/// The items of a completions `prompt` or embeddings `input`: one string, a
/// list of strings, one token list, or a list of token lists.
pub fn items(input: &Value) -> Vec<Value> {
    match input {
        Value::Array(list) if list.iter().all(Value::is_number) => vec![input.clone()],
        Value::Array(list) => list.clone(),
        other => vec![other.clone()],
    }
}

/// A unit-length vector that depends only on `item` and `dim`.
pub fn embedding(item: &Value, dim: usize) -> Vec<f32> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    item.to_string().hash(&mut hasher);
    let mut state = hasher.finish() | 1;
    let raw: Vec<f32> = (0..dim)
        .map(|_| {
            // xorshift64: a fixed, dependency-free sequence is all a simulator needs
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    raw.into_iter().map(|x| x / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_deterministic_and_counts_its_tokens() {
        assert_eq!(text(3), "This is a");
        assert_eq!(count_words(&text(11)), 11);
    }

    #[test]
    fn chat_prompt_counts_words_of_text_parts() {
        let messages = [
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "one two three"}, {"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        assert_eq!(chat_prompt_tokens(&messages), 6);
    }

    #[test]
    fn input_shapes() {
        assert_eq!(items(&json!("a b")).len(), 1);
        assert_eq!(items(&json!(["a", "b"])).len(), 2);
        assert_eq!(items(&json!([1, 2, 3])).len(), 1);
        assert_eq!(item_tokens(&json!([1, 2, 3])), 3);
        assert_eq!(items(&json!([[1], [2, 3]])).len(), 2);
    }

    #[test]
    fn embeddings_are_stable_unit_vectors() {
        let a = embedding(&json!("hello"), 8);
        assert_eq!(a, embedding(&json!("hello"), 8));
        assert_ne!(a, embedding(&json!("world"), 8));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
