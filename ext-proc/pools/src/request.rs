//! What a request's body tells the picker, read in one pass: the model it
//! asks for, and the prompt (the raw JSON of `messages`, `prompt` or
//! `input`), whose bytes the prefix index hashes as they are.

use modelgate_proto::error::GatewayError;

#[derive(Debug, PartialEq)]
pub struct PickFields<'a> {
    pub model: String,
    pub prompt: &'a [u8],
}

pub fn pick_fields(body: &[u8]) -> Result<PickFields<'_>, GatewayError> {
    let _ = body;
    Err(GatewayError::missing_required_parameter("model"))
}
