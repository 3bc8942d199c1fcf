//! Deterministic "generation": token counts, text and embeddings that depend
//! only on the request, so tests can predict them.

use crate::tokenizer;
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

/// The text a chat's messages give the engine: every text part, one to a line, and a
/// placeholder token for each image or audio part.
pub fn chat_prompt(messages: &[Value]) -> String {
    let mut lines: Vec<&str> = Vec::new();
    for message in messages {
        match &message["content"] {
            Value::String(s) => lines.push(s),
            Value::Array(parts) => lines.extend(parts.iter().map(|part| part["text"].as_str().unwrap_or(MEDIA))),
            _ => {}
        }
    }
    lines.join("\n")
}

/// The one token an image or audio part costs, as a fixed amount does in real engines.
pub const MEDIA: &str = "<media>";

/// The token ids of a completions `prompt` or an embeddings `input` item: a
/// string's tokens, or the token list itself.
pub fn item_ids(item: &Value) -> Vec<u32> {
    match item {
        Value::String(s) => tokenizer::ids(s),
        Value::Array(tokens) => {
            tokens.iter().map(|t| t.as_u64().map_or(0, |t| t.min(u64::from(u32::MAX)) as u32)).collect()
        }
        _ => Vec::new(),
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
        assert_eq!(tokenizer::count(&text(11)), 11);
    }

    #[test]
    fn a_chat_prompt_has_the_text_parts_and_a_token_per_image() {
        let messages = [
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "one two three"}, {"type": "image_url", "image_url": {"url": "x"}}]}),
        ];
        assert_eq!(chat_prompt(&messages), "be brief\none two three\n<media>");
        assert_eq!(tokenizer::count(&chat_prompt(&messages)), 6);
    }

    #[test]
    fn input_shapes() {
        assert_eq!(items(&json!("a b")).len(), 1);
        assert_eq!(items(&json!(["a", "b"])).len(), 2);
        assert_eq!(items(&json!([1, 2, 3])).len(), 1);
        assert_eq!(item_ids(&json!([1, 2, 3])), [1, 2, 3]);
        assert_eq!(item_ids(&json!("a b")).len(), 2);
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
