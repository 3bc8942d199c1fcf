//! Error answers in the shapes real backends and the boxes in front of them
//! send, for testing that the gateway turns each into an OpenAI error.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The answer with its body compressed with gzip, as a server does for a client that accepts it.
pub async fn gzipped(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    parts.headers.insert(header::CONTENT_ENCODING, header::HeaderValue::from_static("gzip"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(gzip(&bytes)))
}

/// `data` in the gzip format, in stored (uncompressed) deflate blocks: valid
/// gzip for any client, without a compression library.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut blocks = data.chunks(u16::MAX as usize).peekable();
    if blocks.peek().is_none() {
        out.extend([1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let len = block.len() as u16;
        out.push(u8::from(blocks.peek().is_none()));
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend(block);
    }
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorFormat {
    /// vLLM's current shape: `{"error":{...,"code":<status as integer>}}`.
    Vllm,
    /// Older vLLM: `{"object":"error","message":...,"code":<integer>}`.
    VllmFlat,
    /// Exactly OpenAI's envelope.
    Openai,
    /// A load balancer's HTML error page.
    Html,
    /// Plain text.
    Text,
    /// No body at all.
    Empty,
    /// No answer at all: the connection drops before the status line, as when a backend crashes.
    Reset,
}

impl ErrorFormat {
    pub fn parse(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, true).ok()
    }
}

/// vLLM's error answer.
pub fn vllm_error(status: u16, message: &str) -> Response {
    failure(status, message, ErrorFormat::Vllm, None)
}

fn vllm_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        404 => "NotFoundError",
        429 => "RateLimitError",
        _ => "InternalServerError",
    }
}

/// An error answer with `status` in `format`, with a `retry-after` if given.
pub fn failure(status: u16, message: &str, format: ErrorFormat, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = status.as_u16();
    let mut response = match format {
        ErrorFormat::Vllm => {
            Json(json!({"error": {"message": message, "type": vllm_type(code), "param": null, "code": code}}))
                .into_response()
        }
        ErrorFormat::VllmFlat => {
            Json(json!({"object": "error", "message": message, "type": vllm_type(code), "param": null, "code": code}))
                .into_response()
        }
        ErrorFormat::Openai => {
            Json(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "simulated"}}))
                .into_response()
        }
        ErrorFormat::Html => (
            [(header::CONTENT_TYPE, "text/html")],
            format!(
                "<html><head><title>{code} {}</title></head><body><center>nginx</center></body></html>",
                status.canonical_reason().unwrap_or("Error")
            ),
        )
            .into_response(),
        ErrorFormat::Text => ([(header::CONTENT_TYPE, "text/plain")], message.to_string()).into_response(),
        ErrorFormat::Empty => ().into_response(),
        ErrorFormat::Reset => {
            // A body that fails before its first byte makes hyper drop the connection
            // without writing the response head.
            let failing = tokio_stream::once(Err::<axum::body::Bytes, _>(std::io::Error::other("simulated reset")));
            return axum::body::Body::from_stream(failing).into_response();
        }
    };
    *response.status_mut() = status;
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_has_its_header_a_stored_block_and_the_standard_checksum() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let zipped = gzip(b"hi");
        assert_eq!(zipped[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        assert_eq!(zipped[10..17], [1, 2, 0, 0xfd, 0xff, b'h', b'i']);
        assert_eq!(zipped[21..], 2u32.to_le_bytes());
    }
}
