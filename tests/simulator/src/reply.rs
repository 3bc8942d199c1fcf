//! What a simulated model answers, whichever API asks: generated text, a JSON
//! document that fits a requested schema, or a call of an offered tool.

use crate::{generate, tokenizer};
use serde_json::{json, Map, Value};

/// The substance of one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Generated text, as many tokens as planned.
    Text,
    /// A JSON document, for a structured-output request.
    Json(String),
    /// A call of the tool `name` with these arguments (JSON text).
    Call { name: String, arguments: String },
}

/// What a request offers and asks, read from its API's own fields.
pub struct Ask<'a> {
    /// The offered tools: name and parameter schema.
    pub tools: Vec<(&'a str, &'a Value)>,
    /// The tool the request's tool choice names, if any.
    pub forced: Option<&'a str>,
    /// The tool choice is `none`.
    pub no_tools: bool,
    /// The conversation ends with a tool's result: the model answers in text.
    pub answered: bool,
    /// The schema a structured output must fit (`{}` for any JSON object).
    pub schema: Option<&'a Value>,
}

impl Reply {
    /// With tools offered and not refused, a conversation that does not end in a tool's result
    /// gets a call of the chosen tool (the first, unless one is named); else a requested format's
    /// JSON, or text.
    pub fn to(ask: &Ask) -> Reply {
        let tool = match ask.forced {
            Some(name) => ask.tools.iter().find(|(n, _)| *n == name),
            None => ask.tools.first(),
        };
        match (tool, ask.schema) {
            (Some((name, parameters)), _) if !ask.no_tools && !ask.answered => {
                Reply::Call { name: name.to_string(), arguments: fitting(parameters).to_string() }
            }
            (_, Some(schema)) => Reply::Json(fitting(schema).to_string()),
            _ => Reply::Text,
        }
    }

    /// The pieces it streams in: `tokens` generated tokens, or a JSON text eight characters at a time.
    pub fn pieces(&self, tokens: u32) -> Vec<String> {
        match self {
            Reply::Text => (0..tokens).map(generate::token).collect(),
            Reply::Json(text) | Reply::Call { arguments: text, .. } => {
                let chars: Vec<char> = text.chars().collect();
                chars.chunks(8).map(|c| c.iter().collect()).collect()
            }
        }
    }

    /// Tokens it costs, given the text's planned tokens.
    pub fn tokens(&self, text_tokens: u32) -> u32 {
        match self {
            Reply::Text => text_tokens,
            Reply::Json(text) | Reply::Call { arguments: text, .. } => tokenizer::count(text),
        }
    }
}

/// A value of a JSON schema's type: strings are "simulated", numbers 1, and
/// objects have every property the schema lists.
pub fn fitting(schema: &Value) -> Value {
    match schema["type"].as_str() {
        Some("string") => json!("simulated"),
        Some("integer" | "number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        Some("null") => Value::Null,
        _ => {
            let properties = schema["properties"].as_object().into_iter().flatten();
            Value::Object(properties.map(|(name, schema)| (name.clone(), fitting(schema))).collect::<Map<_, _>>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
               "where": {"type": "object", "properties": {"lat": {"type": "number"}}}}})
    }

    #[test]
    fn a_tool_is_called_until_it_answered_and_a_format_is_fitted() {
        let schema = weather();
        let mut ask = Ask {
            tools: vec![("a", &schema), ("b", &schema)],
            forced: None,
            no_tools: false,
            answered: false,
            schema: None,
        };
        let call = Reply::to(&ask);
        assert_eq!(
            call,
            Reply::Call { name: "a".into(), arguments: r#"{"city":"simulated","days":1,"where":{"lat":1}}"#.into() }
        );
        ask.forced = Some("b");
        assert!(matches!(Reply::to(&ask), Reply::Call { name, .. } if name == "b"));
        ask.answered = true;
        assert_eq!(Reply::to(&ask), Reply::Text);
        ask.schema = Some(&schema);
        assert!(matches!(Reply::to(&ask), Reply::Json(_)));
        assert_eq!(call.pieces(0).concat(), r#"{"city":"simulated","days":1,"where":{"lat":1}}"#);
        assert_eq!(Reply::Text.pieces(3).concat(), "This is a");
    }
}
