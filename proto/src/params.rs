//! A request's parameters read from their raw JSON text (a value the parser
//! has already checked and skipped over), with OpenAI's errors for a value of
//! the wrong type. Reading the text spares building a value: a prompt nested
//! too deep to build is still named for what it is.

use crate::error::GatewayError;

/// The JSON type of a checked value, from its text, as OpenAI's errors name it.
pub fn type_name(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b't' | b'f') => "a boolean",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        _ if raw.parse::<i64>().is_ok() || raw.parse::<u64>().is_ok() => "an integer",
        _ => "a decimal",
    }
}

/// The `model` a request names: a string that is not empty.
pub fn model(raw: Option<&str>) -> Result<String, GatewayError> {
    let invalid = |got| GatewayError::invalid_type("model", "a string", Some(got));
    match raw {
        None | Some("null") => Err(GatewayError::missing_required_parameter("model")),
        Some(raw) if raw.starts_with('"') => match serde_json::from_str::<String>(raw) {
            Ok(model) if model.is_empty() => Err(GatewayError::empty_string("model")),
            Ok(model) => Ok(model),
            // A string the parser has already read whole always reads again.
            Err(_) => Err(invalid("a string")),
        },
        Some(raw) => Err(invalid(type_name(raw))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_named_as_openai_names_them() {
        for (raw, name) in [
            ("true", "a boolean"),
            ("[1]", "an array"),
            ("{}", "an object"),
            (r#""x""#, "a string"),
            ("null", "null"),
            ("-7", "an integer"),
            ("18446744073709551615", "an integer"),
            ("1.5", "a decimal"),
            ("1e3", "a decimal"),
        ] {
            assert_eq!(type_name(raw), name, "{raw}");
        }
    }

    #[test]
    fn a_model_is_a_string_that_is_not_empty() {
        assert_eq!(model(Some(r#""m\u0031""#)).unwrap(), "m1");
        assert_eq!(model(None).unwrap_err().code, Some(crate::error::ErrorCode::MissingRequiredParameter));
        assert_eq!(model(Some("null")).unwrap_err().code, Some(crate::error::ErrorCode::MissingRequiredParameter));
        assert_eq!(model(Some(r#""""#)).unwrap_err().code, Some(crate::error::ErrorCode::EmptyString));
        assert!(model(Some("[1]")).unwrap_err().message.contains("got an array"));
    }
}
