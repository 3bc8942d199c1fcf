//! What one answered request used: the record the filter sends to ext-proc's
//! admin port, where it becomes metrics and the usage report.
//!
//! The filter batches records (one JSON object per line) and posts them
//! about once a second, so accounting costs no call per request.

use crate::config::Price;
use crate::framing::{sse_events, CompleteEvents, Framing};
use serde::{Deserialize, Serialize};

/// Token counts as the backend reported them in `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The counts one `usage` object gives, in any of the APIs' names: chat
/// completions' `prompt_tokens`/`completion_tokens`, the Responses and
/// Messages APIs' `input_tokens`/`output_tokens`. Cached tokens are part of
/// chat's and the Responses API's input; Anthropic's `input_tokens` leaves out
/// the tokens read from and written to its cache, which it counts beside them,
/// and they are added back. A stream may give them in parts (Anthropic's
/// `message_start` the input, `message_delta` the output), merged field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// A `usage` object as sent: chat completions' names or the other APIs'.
/// Both may be there (a backend that writes both): chat's win.
#[derive(Deserialize)]
struct Named {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let named = Named::deserialize(deserializer)?;
        Ok(Counts {
            prompt_tokens: named.prompt_tokens.or(named.input_tokens),
            completion_tokens: named.completion_tokens.or(named.output_tokens),
            cache_read_input_tokens: named.cache_read_input_tokens,
            cache_creation_input_tokens: named.cache_creation_input_tokens,
        })
    }
}

impl Counts {
    /// These counts, with `later`'s where it gives them.
    fn merged(earlier: Option<Counts>, later: Counts) -> Counts {
        let earlier = earlier.unwrap_or_default();
        Counts {
            prompt_tokens: later.prompt_tokens.or(earlier.prompt_tokens),
            completion_tokens: later.completion_tokens.or(earlier.completion_tokens),
            cache_read_input_tokens: later.cache_read_input_tokens.or(earlier.cache_read_input_tokens),
            cache_creation_input_tokens: later.cache_creation_input_tokens.or(earlier.cache_creation_input_tokens),
        }
    }

    fn usage(self) -> Usage {
        let cached = [self.cache_read_input_tokens, self.cache_creation_input_tokens];
        Usage {
            prompt_tokens: cached
                .into_iter()
                .flatten()
                .fold(self.prompt_tokens.unwrap_or_default(), u64::saturating_add),
            completion_tokens: self.completion_tokens.unwrap_or_default(),
        }
    }
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// What these tokens cost at `price`, in US dollars.
    pub fn cost(&self, price: &Price) -> f64 {
        (self.prompt_tokens as f64 * price.input_per_million + self.completion_tokens as f64 * price.output_per_million)
            / 1_000_000.0
    }
}

/// Longest value a client can put in a label, a log field or a record.
pub const MAX_LABEL_LEN: usize = 128;

/// Shown instead of a value that is out of bounds: too long, or with
/// characters outside [`is_bounded`]'s alphabet.
pub const INVALID: &str = "(invalid)";

/// Shown instead of a model name that is not a label (yet): one no backend
/// has answered successfully, or one past ext-proc's cap on names.
pub const OTHER_MODELS: &str = "(other)";

/// True for a value fit to be a label, a log field or part of a record: at
/// most [`MAX_LABEL_LEN`] bytes of ASCII letters, digits and `-._:/@+=`
/// (model names such as `org/model-7b:q4@v1`, request ids, UUIDs), or one of
/// the placeholders. The empty value is bounded too (nothing to show).
pub fn is_bounded(value: &str) -> bool {
    let alphabet = |b: u8| b.is_ascii_alphanumeric() || b"-._:/@+=".contains(&b);
    (value.len() <= MAX_LABEL_LEN && value.bytes().all(alphabet)) || value == INVALID || value == OTHER_MODELS
}

/// `value` if it is bounded, else [`INVALID`].
pub fn bounded(value: &str) -> &str {
    if is_bounded(value) {
        value
    } else {
        INVALID
    }
}

/// Whose request it was: a client's own, or a line of a batch that ext-proc's
/// runner sent on the client's behalf. Metrics and the usage report keep them apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    #[default]
    Interactive,
    Batch,
}

impl Traffic {
    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::Interactive => "interactive",
            Traffic::Batch => "batch",
        }
    }

    /// Left out of what is sent when interactive, so a receiver that predates batches still reads it.
    pub fn is_interactive(&self) -> bool {
        *self == Traffic::Interactive
    }
}

/// One request, as the gateway answered it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// The request's `x-request-id`, bounded ([`is_bounded`]).
    pub request_id: String,
    /// When the answer ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The client key's name; empty for an open gateway or a refused key. Never the key itself.
    pub key: String,
    /// The model the client asked for; empty when the request never named one.
    pub model: String,
    /// The model name may become a label: an exact route names it, or a
    /// backend answered it successfully. Other names are client input that
    /// only a backend can vouch for, and are counted as [`OTHER_MODELS`]
    /// until one does.
    #[serde(default)]
    pub model_served: bool,
    /// The backend that answered; empty when the gateway answered itself (a refusal).
    pub backend: String,
    /// The HTTP status the client got.
    pub status: u16,
    pub stream: bool,
    /// Tokens, when the answer reported them.
    pub usage: Option<Usage>,
    /// What those tokens cost at the configured prices, in US dollars; none without a price.
    pub cost_usd: Option<f64>,
    /// From the request's first byte to the answer's last, in microseconds.
    pub latency_us: u64,
    /// From the request's first byte to the answer's first body byte (a stream's first chunk).
    pub ttft_us: Option<u64>,
    /// A stream's gaps between consecutive chunks, in microseconds.
    #[serde(default)]
    pub itl_us: Vec<u64>,
    /// Interactive unless a batch's runner sent it (absent from older senders' records).
    #[serde(default, skip_serializing_if = "Traffic::is_interactive")]
    pub traffic: Traffic,
    /// The answer came from the gateway's store, not a backend: a cache hit or
    /// an idempotent repeat. Its tokens were served, not used; it costs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_from: Option<crate::gate::ReplaySource>,
    /// The budget reservation the request holds ([`crate::gate::GateRequest::reservation`]),
    /// settled with this record's cost and tokens, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_reservation: Option<String>,
}

impl UsageRecord {
    /// Appends this record as JSON, byte for byte what serde_json writes for
    /// it: the filter writes one per request, and serde's field-by-field
    /// calls cost it more than the record's few short values do.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"request_id\":");
        write_str(out, &self.request_id);
        out.extend_from_slice(b",\"at_ms\":");
        write_u64(out, self.at_ms);
        out.extend_from_slice(b",\"key\":");
        write_str(out, &self.key);
        out.extend_from_slice(b",\"model\":");
        write_str(out, &self.model);
        out.extend_from_slice(if self.model_served { b",\"model_served\":true" } else { b",\"model_served\":false" });
        out.extend_from_slice(b",\"backend\":");
        write_str(out, &self.backend);
        out.extend_from_slice(b",\"status\":");
        write_u64(out, self.status.into());
        out.extend_from_slice(if self.stream { b",\"stream\":true" } else { b",\"stream\":false" });
        out.extend_from_slice(b",\"usage\":");
        match self.usage {
            Some(usage) => {
                out.extend_from_slice(b"{\"prompt_tokens\":");
                write_u64(out, usage.prompt_tokens);
                out.extend_from_slice(b",\"completion_tokens\":");
                write_u64(out, usage.completion_tokens);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"cost_usd\":");
        // Floats as serde_json formats them (non-finite ones as null).
        write_serde(out, &self.cost_usd);
        out.extend_from_slice(b",\"latency_us\":");
        write_u64(out, self.latency_us);
        out.extend_from_slice(b",\"ttft_us\":");
        match self.ttft_us {
            Some(us) => write_u64(out, us),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"itl_us\":[");
        for (i, gap) in self.itl_us.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_u64(out, *gap);
        }
        out.push(b']');
        if !self.traffic.is_interactive() {
            out.extend_from_slice(b",\"traffic\":");
            write_str(out, self.traffic.as_str());
        }
        if let Some(source) = &self.served_from {
            out.extend_from_slice(b",\"served_from\":");
            write_serde(out, source);
        }
        if let Some(reservation) = &self.budget_reservation {
            out.extend_from_slice(b",\"budget_reservation\":");
            write_str(out, reservation);
        }
        out.push(b'}');
    }
}

/// `value` as a JSON string. Values in records are bounded ([`is_bounded`])
/// and need no escaping; any other is escaped by serde_json.
fn write_str(out: &mut Vec<u8>, value: &str) {
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        write_serde(out, value);
        return;
    }
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// What serde_json writes for `value`; writing to a `Vec` cannot fail, nor can these values.
fn write_serde<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

/// Requests the gateway refused itself before any backend (a bad body, an
/// unknown model, a rate limit), by key, model and status: counted per
/// worker and sent with its next batch instead of one record each, so a
/// flood of refusals cannot crowd other requests' records out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refused {
    pub key: String,
    pub model: String,
    /// As [`UsageRecord::model_served`]: only an exact route can vouch for a refused request's model.
    pub model_served: bool,
    pub status: u16,
    pub count: u64,
    #[serde(default, skip_serializing_if = "Traffic::is_interactive")]
    pub traffic: Traffic,
}

/// The last line of a worker's batch, when it has anything to say: what it
/// counted instead of recording since its previous batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tally {
    /// When the worker took the batch, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub refused: Vec<Refused>,
    /// Usage records the worker dropped: its outbox was full while ext-proc did not take them.
    pub dropped_records: u64,
    /// Budget reservations of requests that ended without a usage record
    /// (refused when the gate gave no verdict, or left by their client while
    /// it decided): each is settled at nothing, or, if the gate has not made
    /// it yet, kept from being made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_reservations: Vec<String>,
}

/// Where an answer's `usage` begins: the member name, then `:` and an object.
const USAGE_KEY: &[u8] = b"\"usage\"";

/// A `usage` object is small; one that has not closed after this much is not one.
const MAX_USAGE_BYTES: usize = 4096;

/// What the bytes after a `"usage"` member name hold so far.
enum Member {
    /// An object with token counts.
    Usage(Counts),
    /// Anything else: `null`, a string that merely ends in `"usage"`, a malformed object.
    NotUsage,
    /// Cut off before the value ended: more bytes are needed.
    Incomplete,
}

/// Reads a `"usage"` member from `after`, the bytes just after its name.
fn read_member(after: &[u8]) -> Member {
    read_member_with(after, |value| plain_counts(value).map_or_else(|| serde_counts(value), Ok))
}

fn serde_counts(value: &[u8]) -> Result<Counts, serde_json::Error> {
    Counts::deserialize(&mut serde_json::Deserializer::from_slice(value))
}

/// Reads a `"usage"` member from `after`, its object's counts by `counts`.
fn read_member_with(after: &[u8], counts: impl Fn(&[u8]) -> Result<Counts, serde_json::Error>) -> Member {
    let rest = after.trim_ascii_start();
    let room = after.len() < MAX_USAGE_BYTES;
    let Some((&b':', value)) = rest.split_first() else {
        return if rest.is_empty() && room { Member::Incomplete } else { Member::NotUsage };
    };
    let value = value.trim_ascii_start();
    match value.first() {
        None if room => Member::Incomplete,
        None => Member::NotUsage,
        Some(b'{') => match counts(value) {
            Ok(Counts { prompt_tokens: None, completion_tokens: None, .. }) => Member::NotUsage,
            Ok(counts) => Member::Usage(counts),
            Err(e) if at_end(&e, value) && value.len() < MAX_USAGE_BYTES => Member::Incomplete,
            Err(_) => Member::NotUsage,
        },
        Some(_) => Member::NotUsage,
    }
}

/// The counts of the `usage` object `value` begins with, read without
/// serde where it is plain JSON, as backends write it: member names without
/// escapes, counts that are integers or null, other values that are numbers,
/// literals, ASCII strings without escapes, or arrays and objects of those,
/// a few deep. `None` for anything else (and for an object cut off), which
/// serde_json reads instead; where this reads counts, serde_json reads the same.
fn plain_counts(value: &[u8]) -> Option<Counts> {
    let mut scan = Scan { bytes: value, at: 1 };
    let mut named = [None; 6];
    let mut seen = [false; 6];
    if scan.peek()? != b'}' {
        loop {
            let name = scan.string()?;
            scan.expect(b':')?;
            match COUNT_NAMES.iter().position(|n| *n == name) {
                // serde refuses a count given twice.
                Some(field) if !std::mem::replace(&mut seen[field], true) => named[field] = scan.count()?,
                Some(_) => return None,
                None => scan.skip_value(0)?,
            }
            match scan.peek()? {
                b',' => scan.at += 1,
                b'}' => break,
                _ => return None,
            }
        }
    }
    let [prompt, completion, input, output, cache_read, cache_creation] = named;
    Some(Counts {
        prompt_tokens: prompt.or(input),
        completion_tokens: completion.or(output),
        cache_read_input_tokens: cache_read,
        cache_creation_input_tokens: cache_creation,
    })
}

/// The names [`Named`] reads, in the order [`plain_counts`] keeps them.
const COUNT_NAMES: [&[u8]; 6] = [
    b"prompt_tokens",
    b"completion_tokens",
    b"input_tokens",
    b"output_tokens",
    b"cache_read_input_tokens",
    b"cache_creation_input_tokens",
];

/// Arrays and objects nested deeper than this in a `usage` object are left to serde_json.
const MAX_PLAIN_DEPTH: usize = 8;

/// A cursor over plain JSON for [`plain_counts`]: each step is `None` where
/// the JSON is not plain or ends.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    /// The next byte that is not JSON whitespace, not taken.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.bytes.get(self.at) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string's contents: printable ASCII without escapes.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let rest = self.bytes.get(self.at..)?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))?;
        (rest[end] == b'"').then(|| {
            self.at += end + 1;
            &rest[..end]
        })
    }

    /// A count: `null`, or an integer that fits a `u64`, written without leading zeros.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        let digits = self.digits();
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        // A fraction or an exponent makes a float, which serde refuses as a count.
        if digits.is_empty() || leading_zero || matches!(self.bytes.get(self.at)?, b'.' | b'e' | b'E') {
            return None;
        }
        digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0'))).map(Some)
    }

    fn digits(&mut self) -> &'a [u8] {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        &self.bytes[start..self.at]
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes.get(self.at..)?.starts_with(word).then(|| self.at += word.len())
    }

    /// Skips any plain value, `depth` arrays and objects deep.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            open @ (b'[' | b'{') if depth < MAX_PLAIN_DEPTH => {
                self.at += 1;
                let close = if open == b'[' { b']' } else { b'}' };
                if self.peek()? == close {
                    self.at += 1;
                    return Some(());
                }
                loop {
                    if open == b'{' {
                        self.string()?;
                        self.expect(b':')?;
                    }
                    self.skip_value(depth + 1)?;
                    match self.peek()? {
                        b',' => self.at += 1,
                        b if b == close => {
                            self.at += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// A number as JSON writes it: `-`, an integer part without leading zeros, a fraction, an exponent.
    fn number(&mut self) -> Option<()> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let int = self.digits();
        if int.is_empty() || (int[0] == b'0' && int.len() > 1) {
            return None;
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits().is_empty() {
                return None;
            }
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits().is_empty() {
                return None;
            }
        }
        // What ends the number is read by the caller; the end of the bytes may be a number cut off.
        self.bytes.get(self.at).map(drop)
    }
}

/// True when parsing `json` failed at its very end, so more bytes may mend
/// it: serde_json calls a number cut after its `-`, `.` or `e` invalid, not
/// cut off, but says where (in bytes, lines from 1).
fn at_end(error: &serde_json::Error, json: &[u8]) -> bool {
    let line_start = json.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = 1 + json.iter().filter(|&&b| b == b'\n').count();
    error.is_eof() || (error.line() == lines && error.column() == json.len() - line_start)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(haystack.get(from..)?, needle).map(|i| i + from)
}

/// Finds the `usage` of an answer that arrives in pieces, without keeping
/// the answer: only a few bytes across each boundary, and the `usage` object
/// itself once it has begun. Later counts win over earlier ones, field by
/// field: the top-level `usage` of an OpenAI answer comes after its choices,
/// and an Anthropic stream gives its output after its input.
#[derive(Debug, Default)]
pub struct UsageReader {
    /// The end of the previous piece (a `"usage"` may straddle two), or an unfinished member.
    pending: Vec<u8>,
    found: Option<Counts>,
}

impl UsageReader {
    pub fn feed(&mut self, piece: &[u8]) {
        // Most pieces leave nothing behind, and are read where they lie.
        if self.pending.is_empty() {
            let keep = self.read(piece);
            self.pending.extend_from_slice(&piece[keep..]);
            return;
        }
        let mut window = std::mem::take(&mut self.pending);
        window.extend_from_slice(piece);
        let keep = self.read(&window);
        window.drain(..keep);
        self.pending = window;
    }

    /// Reads the `usage` members in `window`, and says where the bytes to
    /// keep for the next piece begin: an unfinished member, or what could be
    /// the start of a `"usage"` cut off by the boundary.
    fn read(&mut self, window: &[u8]) -> usize {
        let mut from = 0;
        while let Some(at) = find(window, USAGE_KEY, from) {
            let after = at + USAGE_KEY.len();
            match read_member(&window[after..]) {
                Member::Usage(counts) => self.found = Some(Counts::merged(self.found, counts)),
                Member::NotUsage => {}
                Member::Incomplete => return at,
            }
            from = after;
        }
        let tail = window.len().saturating_sub(USAGE_KEY.len() - 1).max(from);
        (tail..window.len()).find(|&i| USAGE_KEY.starts_with(&window[i..])).unwrap_or(window.len())
    }

    /// The usage found in everything fed so far.
    pub fn usage(&self) -> Option<Usage> {
        self.found.map(Counts::usage)
    }
}

/// A stream whose client did not ask for usage, though the gateway did (to
/// count tokens): the usage chunk is read and removed, and so is the
/// `"usage":null` the backend adds to every other chunk, so the client gets
/// exactly the stream it asked for. Events are passed on as soon as they are
/// complete (lines may end in LF, CR or CRLF); only an unfinished event waits
/// for the rest of it, up to [`MAX_HELD_EVENT_BYTES`]. A longer event cannot
/// be held: from there on the stream passes unstripped (the client sees the
/// `usage` it did not ask for, which OpenAI's SDKs accept), and its usage is
/// still read, so the tokens are counted all the same.
#[derive(Debug)]
pub struct UnaskedUsage {
    events: CompleteEvents,
    /// Set once an event outgrew the limit: reads the rest of the stream as it passes.
    unframed: Option<UsageReader>,
    /// The usage chunk was removed with a CR last, and the LF of its CRLF may come with the next piece.
    removed_before_lf: bool,
    found: Option<Counts>,
}

/// The most of one unfinished event the filter holds per stream. Chat
/// completion chunks are far smaller; a longer one only costs the stripping.
pub const MAX_HELD_EVENT_BYTES: usize = 1 << 20;

impl Default for UnaskedUsage {
    fn default() -> Self {
        Self::with_limit(MAX_HELD_EVENT_BYTES)
    }
}

impl UnaskedUsage {
    /// Holds at most `max_event_bytes` of an unfinished event.
    pub fn with_limit(max_event_bytes: usize) -> Self {
        UnaskedUsage {
            events: CompleteEvents::new(Framing::Sse, max_event_bytes),
            unframed: None,
            removed_before_lf: false,
            found: None,
        }
    }

    /// The bytes to pass on for `piece`; `last` for the stream's final piece.
    pub fn pass(&mut self, piece: &[u8], last: bool) -> Vec<u8> {
        if let Some(reader) = &mut self.unframed {
            reader.feed(piece);
            return piece.to_vec();
        }
        let mut out = Vec::with_capacity(piece.len());
        match self.events.take(piece, last) {
            Ok(complete) => sse_events(&complete).for_each(|event| self.pass_event(event, &mut out)),
            Err(long) => {
                sse_events(&long.complete).for_each(|event| self.pass_event(event, &mut out));
                let mut reader = UsageReader::default();
                reader.feed(&long.rest);
                out.extend_from_slice(&long.rest);
                self.unframed = Some(reader);
            }
        }
        out
    }

    fn pass_event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let event = if std::mem::take(&mut self.removed_before_lf) {
            event.strip_prefix(b"\n").unwrap_or(event)
        } else {
            event
        };
        // The last one: a chunk's own `usage` follows its choices, whose content may say "usage".
        let Some(at) = memchr::memmem::rfind(event, USAGE_KEY) else {
            out.extend_from_slice(event);
            return;
        };
        let after = &event[at + USAGE_KEY.len()..];
        if let Member::Usage(counts) = read_member(after) {
            self.found = Some(Counts::merged(self.found, counts));
            // A backend that puts usage on a chunk with choices keeps it there: content is never dropped.
            if has_no_choices(event) {
                self.removed_before_lf = event.ends_with(b"\r");
                return;
            }
        }
        match null_member(event, at) {
            Some((from, to)) => {
                out.extend_from_slice(&event[..from]);
                out.extend_from_slice(&event[to..]);
            }
            None => out.extend_from_slice(event),
        }
    }

    /// The usage found so far, merged as [`UsageReader`] merges it.
    pub fn usage(&self) -> Option<Usage> {
        let later = self.unframed.as_ref().and_then(|reader| reader.found);
        later.map_or(self.found, |later| Some(Counts::merged(self.found, later))).map(Counts::usage)
    }
}

/// How a stream's usage is found as it passes, by the filter or, for a guarded
/// stream, by the stream guard: read where it stands, or, where the gateway
/// asked for it and the client did not, read and removed.
#[derive(Debug)]
pub enum UsageWatch {
    Read(UsageReader),
    Unasked(UnaskedUsage),
}

impl UsageWatch {
    /// `unasked` where the client did not ask for the stream's usage.
    pub fn new(unasked: bool) -> Self {
        if unasked {
            UsageWatch::Unasked(UnaskedUsage::default())
        } else {
            UsageWatch::Read(UsageReader::default())
        }
    }

    /// The watch a request header's value names ([`Self::name`]'s), if any.
    pub fn named(name: &[u8]) -> Option<Self> {
        match name {
            b"read" => Some(Self::new(false)),
            b"unasked" => Some(Self::new(true)),
            _ => None,
        }
    }

    /// Its name in the request header that hands it to the stream guard.
    pub fn name(&self) -> &'static str {
        match self {
            UsageWatch::Read(_) => "read",
            UsageWatch::Unasked(_) => "unasked",
        }
    }

    /// Reads `piece` (`last` for the stream's final one): `Some(bytes)` when
    /// the piece must be replaced by those before it goes on.
    pub fn pass(&mut self, piece: &[u8], last: bool) -> Option<Vec<u8>> {
        match self {
            UsageWatch::Read(reader) => {
                reader.feed(piece);
                None
            }
            UsageWatch::Unasked(unasked) => {
                let passed = unasked.pass(piece, last);
                (passed != piece).then_some(passed)
            }
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match self {
            UsageWatch::Read(reader) => reader.usage(),
            UsageWatch::Unasked(unasked) => unasked.usage(),
        }
    }
}

/// True for the usage chunk OpenAI streams last: `"choices": []`.
fn has_no_choices(event: &[u8]) -> bool {
    let Some(at) = find(event, b"\"choices\"", 0) else {
        return false;
    };
    let mut rest = event[at + 9..].iter().filter(|b| !b.is_ascii_whitespace());
    rest.next() == Some(&b':') && rest.next() == Some(&b'[') && rest.next() == Some(&b']')
}

/// The byte range of `"usage": null` at `at` together with one comma next to
/// it, so that removing it leaves valid JSON; `None` if the member is not null.
fn null_member(event: &[u8], at: usize) -> Option<(usize, usize)> {
    let after = &event[at + USAGE_KEY.len()..];
    let colon = after.iter().position(|b| !b.is_ascii_whitespace())?;
    let value = after.get(colon + 1..)?;
    let null_at = colon + 1 + value.iter().position(|b| !b.is_ascii_whitespace())?;
    if !after.get(null_at..)?.starts_with(b"null") || after.get(colon) != Some(&b':') {
        return None;
    }
    let end = at + USAGE_KEY.len() + null_at + 4;
    let before = event[..at].trim_ascii_end();
    if before.last() == Some(&b',') {
        return Some((before.len() - 1, end));
    }
    let rest = &event[end..];
    let comma = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    (rest[comma] == b',').then_some((at, end + comma + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const USAGE: Usage = Usage { prompt_tokens: 12, completion_tokens: 7 };

    #[test]
    fn a_usage_cut_inside_a_number_waits_for_the_rest() {
        // serde_json calls `4.`, `4e` and `-` invalid numbers, not cut-off ones.
        let answer = br#"{"usage":{"prompt_tokens":12,"queue_time":-4.5e-3,"completion_tokens":7}}"#;
        for cut in 0..=answer.len() {
            let mut reader = UsageReader::default();
            reader.feed(&answer[..cut]);
            reader.feed(&answer[cut..]);
            assert_eq!(reader.usage(), Some(USAGE), "cut after {:?}", String::from_utf8_lossy(&answer[..cut]));
        }
    }

    fn read_whole(answer: &[u8]) -> Option<Usage> {
        let mut reader = UsageReader::default();
        reader.feed(answer);
        reader.usage()
    }

    #[test]
    fn usage_is_read_from_an_answer_compact_or_pretty() {
        let compact = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 99}"}}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(read_whole(compact), Some(USAGE));
        let pretty = b"{\n  \"usage\" :\n {\n    \"prompt_tokens\": 12,\n    \"completion_tokens\": 7\n  },\n  \"system_fingerprint\": null\n}";
        assert_eq!(read_whole(pretty), Some(USAGE));
        let embeddings = br#"{"object":"list","data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(read_whole(embeddings), Some(Usage { prompt_tokens: 5, completion_tokens: 0 }));
        for none in [&br#"{"usage":null}"#[..], br#"{"usage":"12"}"#, br#"{"x":1}"#, br#"{"usage":{"tokens":3}}"#] {
            assert_eq!(read_whole(none), None, "{}", String::from_utf8_lossy(none));
        }
    }

    #[test]
    fn the_responses_and_messages_apis_usage_is_read_under_its_own_names() {
        let response = br#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"the \"usage\": 3"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":19}}"#;
        assert_eq!(read_whole(response), Some(USAGE));
        let message = br#"{"id":"msg_1","type":"message","content":[],"usage":{"input_tokens":12,"cache_read_input_tokens":0,"output_tokens":7}}"#;
        assert_eq!(read_whole(message), Some(USAGE));
        assert_eq!(read_whole(br#"{"input_tokens":3}"#), None, "count_tokens' answer is no usage");
        let both = br#"{"usage":{"prompt_tokens":12,"completion_tokens":7,"input_tokens":12,"output_tokens":7}}"#;
        assert_eq!(read_whole(both), Some(USAGE), "both names, as some backends write them");
        // Anthropic counts the tokens read from and written to its cache beside `input_tokens`.
        let cached = br#"{"type":"message","usage":{"input_tokens":2,"cache_read_input_tokens":6,"cache_creation_input_tokens":4,"output_tokens":7}}"#;
        assert_eq!(read_whole(cached), Some(USAGE));
    }

    #[test]
    fn a_stream_that_gives_its_counts_in_parts_is_counted_whole() {
        // Anthropic's: the input in message_start (with a first output count), the output in message_delta.
        let anthropic = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":0,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(read_whole(anthropic.as_bytes()), Some(USAGE));
        // A translated one: no input at first, everything at the end.
        let translated = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}\n\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":12,\"output_tokens\":7}}\n\n",
        );
        assert_eq!(read_whole(translated.as_bytes()), Some(USAGE));
        // The Responses API's: none until response.completed.
        let responses = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null},\"sequence_number\":0}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":12,\"output_tokens\":7,\"total_tokens\":19}},\"sequence_number\":1}\n\n",
        );
        assert_eq!(read_whole(responses.as_bytes()), Some(USAGE));
    }

    fn stream(chunks: &[&str], usage_chunk: bool) -> String {
        let mut out = String::new();
        for c in chunks {
            out += &format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{c}\"}}}}]{}}}\n\n",
                if usage_chunk { ",\"usage\":null" } else { "" }
            );
        }
        if usage_chunk {
            out += "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\n";
        }
        out + "data: [DONE]\n\n"
    }

    #[test]
    fn a_stream_loses_the_usage_it_did_not_ask_for_and_nothing_else() {
        let asked = stream(&["Hel", "lo"], true);
        let mut unasked = UnaskedUsage::default();
        let out = unasked.pass(asked.as_bytes(), true);
        assert_eq!(String::from_utf8(out).unwrap(), stream(&["Hel", "lo"], false));
        assert_eq!(unasked.usage(), Some(USAGE));
        // The reader finds the same usage where the client asked for it.
        assert_eq!(read_whole(asked.as_bytes()), Some(USAGE));
    }

    #[test]
    fn usage_on_a_chunk_with_content_is_counted_and_the_content_kept() {
        let event = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7}}\n\n";
        let mut unasked = UnaskedUsage::default();
        assert_eq!(unasked.pass(event.as_bytes(), false), event.as_bytes());
        assert_eq!(unasked.usage(), Some(USAGE));
    }

    #[test]
    fn null_usage_is_removed_wherever_it_stands() {
        for (event, expected) in [
            ("data: {\"usage\":null,\"a\":1}\n\n", "data: {\"a\":1}\n\n"),
            (
                "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n",
            ),
            ("data: {\"a\":1, \"usage\" : null}\r\n\r\n", "data: {\"a\":1}\r\n\r\n"),
            ("data: {\"usage\":nullx}\n\n", "data: {\"usage\":nullx}\n\n"),
        ] {
            let mut unasked = UnaskedUsage::default();
            assert_eq!(String::from_utf8(unasked.pass(event.as_bytes(), false)).unwrap(), expected);
        }
    }

    #[test]
    fn an_unfinished_event_waits_and_the_last_piece_flushes_it() {
        let mut unasked = UnaskedUsage::default();
        assert_eq!(unasked.pass(b"data: {\"a\":1}\n\ndata: {\"b\"", false), b"data: {\"a\":1}\n\n");
        assert_eq!(unasked.pass(b":2}", true), b"data: {\"b\":2}");
    }

    /// `stream`'s events with their lines ended by `eol` instead of LF.
    fn with_line_ends(stream: &str, eol: &str) -> String {
        stream.replace('\n', eol)
    }

    #[test]
    fn an_event_too_long_to_hold_passes_the_rest_unstripped_and_its_usage_is_still_counted() {
        let long =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}],\"usage\":null}}\n\n", "x".repeat(100));
        let whole = format!("data: {{\"a\":1,\"usage\":null}}\n\n{long}{}", stream(&["y"], true));
        let mut unasked = UnaskedUsage::with_limit(64);
        let mut out = Vec::new();
        for piece in whole.as_bytes().chunks(10) {
            out.extend(unasked.pass(piece, false));
            assert_held(&unasked, 64);
        }
        out.extend(unasked.pass(b"", true));
        let expected = format!("data: {{\"a\":1}}\n\n{long}{}", stream(&["y"], true));
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(unasked.usage(), Some(USAGE));
    }

    fn assert_held(unasked: &UnaskedUsage, max: usize) {
        let held = unasked.events.held_bytes();
        assert!(held <= max, "{held} bytes held");
    }

    #[test]
    fn only_short_plain_values_are_bounded() {
        for fit in ["", "llama-3.1-8b", "org/model:q4@v1+x=y_z", "3f2b1c7e-0d4a-4e6b-9c1d-2a3b4c5d6e7f", INVALID] {
            assert_eq!(bounded(fit), fit);
        }
        let longest = "m".repeat(MAX_LABEL_LEN);
        assert_eq!(bounded(&longest), longest);
        for odd in [&*format!("{longest}m"), "a b", "a\"b", "caf\u{e9}", "a\nb", "a\0", "{x}", "(y)"] {
            assert_eq!(bounded(odd), INVALID, "{odd:?}");
        }
    }

    #[test]
    fn batch_traffic_is_said_and_interactive_traffic_reads_as_before() {
        let old = r#"{"request_id":"r","at_ms":1,"key":"k","model":"m","backend":"b","status":200,"stream":false,
                      "usage":null,"cost_usd":null,"latency_us":5,"ttft_us":null}"#;
        let record: UsageRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.traffic, Traffic::Interactive, "an older sender's record");
        assert!(!serde_json::to_string(&record).unwrap().contains("traffic"), "an older receiver reads it");
        let batch = UsageRecord { traffic: Traffic::Batch, ..record };
        let sent = serde_json::to_string(&batch).unwrap();
        assert!(sent.contains(r#""traffic":"batch""#), "{sent}");
        assert_eq!(serde_json::from_str::<UsageRecord>(&sent).unwrap(), batch);
        let refused = Refused { traffic: Traffic::Batch, status: 429, count: 2, ..Refused::default() };
        assert_eq!(serde_json::from_str::<Refused>(&serde_json::to_string(&refused).unwrap()).unwrap(), refused);
        assert!(serde_json::from_str::<Refused>(
            r#"{"key":"","model":"","model_served":false,"status":1,"count":1,"traffic":"other"}"#
        )
        .is_err());
    }

    #[test]
    fn every_ascii_character_is_written_as_serde_json_writes_it() {
        for c in (0u8..0x80).map(char::from) {
            let record = UsageRecord { request_id: format!("a{c}b"), key: c.into(), ..UsageRecord::default() };
            let mut written = Vec::new();
            record.write_json(&mut written);
            assert_eq!(String::from_utf8(written).unwrap(), serde_json::to_string(&record).unwrap(), "{c:?}");
        }
    }

    fn any_record() -> impl Strategy<Value = UsageRecord> {
        use crate::gate::ReplaySource;
        // Plain values as the filter writes them, values of every character that is escaped, and any others.
        let text = || {
            prop_oneof!["[a-z0-9./:-]{0,40}", "[\\x00-\\x20\"\\\\a\\x7f\u{e9}\u{2028}\u{1f600}]{0,12}", any::<String>()]
        };
        let usage = (any::<u64>(), any::<u64>())
            .prop_map(|(prompt_tokens, completion_tokens)| Usage { prompt_tokens, completion_tokens });
        let cost = prop_oneof![proptest::num::f64::ANY, (0u32..1_000_000).prop_map(|n| f64::from(n) / 1e7)];
        let source = prop_oneof![Just(ReplaySource::Cache), Just(ReplaySource::Idempotency)];
        let traffic = prop_oneof![Just(Traffic::Interactive), Just(Traffic::Batch)];
        (
            (text(), any::<u64>(), text(), text(), any::<bool>(), text(), any::<u16>(), any::<bool>()),
            (proptest::option::of(usage), proptest::option::of(cost), any::<u64>(), proptest::option::of(any::<u64>())),
            (proptest::collection::vec(any::<u64>(), 0..5), traffic, proptest::option::of(source)),
            proptest::option::of(text()),
        )
            .prop_map(
                |(
                    (request_id, at_ms, key, model, model_served, backend, status, stream),
                    (usage, cost_usd, latency_us, ttft_us),
                    (itl_us, traffic, served_from),
                    budget_reservation,
                )| UsageRecord {
                    request_id,
                    at_ms,
                    key,
                    model,
                    model_served,
                    backend,
                    status,
                    stream,
                    usage,
                    cost_usd,
                    latency_us,
                    ttft_us,
                    itl_us,
                    traffic,
                    served_from,
                    budget_reservation,
                },
            )
    }

    /// The reader as it was before it read pieces in place and plain `usage` objects without serde:
    /// the reference it is held to.
    #[derive(Default)]
    struct SerdeReader {
        pending: Vec<u8>,
        found: Option<Counts>,
    }

    impl SerdeReader {
        fn feed(&mut self, piece: &[u8]) {
            let mut window = std::mem::take(&mut self.pending);
            window.extend_from_slice(piece);
            let mut from = 0;
            while let Some(at) =
                window.windows(USAGE_KEY.len()).skip(from).position(|w| w == USAGE_KEY).map(|i| i + from)
            {
                let after = at + USAGE_KEY.len();
                match read_member_with(&window[after..], serde_counts) {
                    Member::Usage(counts) => self.found = Some(Counts::merged(self.found, counts)),
                    Member::NotUsage => {}
                    Member::Incomplete => {
                        self.pending = window.split_off(at);
                        return;
                    }
                }
                from = after;
            }
            let keep = window.len().saturating_sub(USAGE_KEY.len() - 1).max(from);
            self.pending = window.split_off(keep);
        }
    }

    #[test]
    fn every_odd_count_is_read_as_serde_json_reads_it() {
        for odd in ODD_COUNTS {
            for object in
                [format!("{{\"prompt_tokens\":{odd}}}"), format!("{{\"total_tokens\":{odd},\"output_tokens\":1}}")]
            {
                let plain = plain_counts(object.as_bytes());
                assert!(plain.is_none() || plain == serde_counts(object.as_bytes()).ok(), "{object}");
            }
        }
    }

    /// Counts as backends should not write them.
    const ODD_COUNTS: [&str; 19] = [
        "null",
        "-1",
        "-0",
        "012",
        "1.5",
        "1e3",
        "2E-1",
        "18446744073709551615",
        "18446744073709551616",
        "+1",
        ".5",
        "1.",
        "1e",
        "-",
        "nul",
        "true",
        "\"12\"",
        "{}",
        "[1]",
    ];

    /// JSON whitespace, and a form feed, which JSON does not allow.
    fn space() -> impl Strategy<Value = &'static str> {
        prop_oneof![9 => proptest::sample::select(vec!["", " ", "\n  ", "\t", "\r\n"]), 1 => Just("\x0c")]
    }

    /// A count as backends write it, or as they should not.
    fn count_value() -> impl Strategy<Value = String> {
        let odd = proptest::sample::select(ODD_COUNTS.to_vec());
        prop_oneof![any::<u64>().prop_map(|n| n.to_string()), odd.prop_map(String::from)]
    }

    /// Any other member's value: plain, escaped, nested, or malformed.
    fn other_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            count_value(),
            proptest::sample::select(vec![
                "\"abc\"",
                "\"a\\nb\"",
                "\"caf\u{e9}\"",
                "\"a\tb\"",
                "\"\\u0041\"",
                "\"x\\\"\"",
                "false",
                "tru",
                "-4.5e-3",
                "0.0",
                "[]",
                "{}",
                "[1,]",
                "{\"a\":}",
            ])
            .prop_map(String::from),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|items| format!("[{}]", items.join(","))),
                proptest::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members.iter().map(|(n, v)| format!("\"{n}\":{v}")).collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
    }

    /// A `usage` object, as backends write them and otherwise, with what follows it.
    fn usage_object() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            6 => proptest::sample::select(COUNT_NAMES.iter().map(|n| std::str::from_utf8(n).unwrap()).collect::<Vec<_>>())
                .prop_map(String::from),
            1 => proptest::sample::select(vec!["total_tokens", "prompt_tokens_details", "prompt\\u005ftokens", "x\\\"y", "caf\u{e9}"])
                .prop_map(String::from),
        ];
        let member = (space(), name, space(), prop_oneof![3 => count_value(), 1 => other_value()], space())
            .prop_map(|(a, name, b, value, c)| format!("{a}\"{name}\"{b}:{c}{value}"));
        (
            proptest::collection::vec(member, 0..6),
            space(),
            any::<bool>(),
            proptest::sample::select(vec!["", ",", "}", "x"]),
        )
            .prop_map(|(members, end, trailing_comma, after)| {
                let comma = if trailing_comma && !members.is_empty() { "," } else { "" };
                format!("{{{}{comma}{end}}}{after}", members.join(","))
            })
    }

    /// An answer or a stream: `usage` members among other JSON.
    fn answer_text() -> impl Strategy<Value = String> {
        let part = prop_oneof![
            (space(), space(), usage_object()).prop_map(|(a, b, object)| format!("\"usage\"{a}:{b}{object}")),
            proptest::sample::select(vec![
                "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n",
                "{\"id\":\"x\",\"object\":\"chat.completion\",",
                "\"usage\"",
                "\"usage\":",
                "\"usa",
                "ge\":{\"prompt_tokens\":3}",
                "\"content\":\"the \\\"usage\\\": {\\\"prompt_tokens\\\": 99}\",",
                "}\n\n",
            ])
            .prop_map(String::from),
        ];
        proptest::collection::vec(part, 0..8).prop_map(|parts| parts.concat())
    }

    proptest! {
        /// Where a `usage` object is read without serde, serde_json reads the same counts from it,
        /// cut off anywhere or whole.
        #[test]
        fn plain_counts_are_serde_json_counts(object in usage_object(), cut in 0usize..400) {
            let object = object.as_bytes();
            for value in [object, &object[..cut.min(object.len())]] {
                if let Some(counts) = plain_counts(value) {
                    prop_assert_eq!(Some(counts), serde_counts(value).ok(), "{}", String::from_utf8_lossy(value));
                }
            }
        }

        /// Backends' own `usage` objects are read without serde.
        #[test]
        fn plain_usage_is_read_without_serde(
            counts in proptest::collection::vec((0usize..6, any::<u64>()), 0..6),
            details in proptest::option::of(0u64..100),
        ) {
            let mut members: Vec<String> = Vec::new();
            let mut named = [None; 6];
            for (field, n) in counts {
                if named[field].replace(n).is_none() {
                    members.push(format!("\"{}\": {n}", std::str::from_utf8(COUNT_NAMES[field]).unwrap()));
                }
            }
            members.extend(details.map(|n| format!("\"prompt_tokens_details\":{{\"cached_tokens\":{n},\"audio\":null}}")));
            let object = format!("{{{}}}", members.join(","));
            prop_assert_eq!(plain_counts(object.as_bytes()).ok_or("not plain"), serde_counts(object.as_bytes()).map_err(|_| "serde"));
        }

        /// However an answer is cut into pieces, the reader finds what the reader before it found.
        #[test]
        fn usage_is_read_as_serde_json_reads_it(text in answer_text(), cuts in proptest::collection::vec(0usize..600, 0..8)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let (mut reader, mut reference) = (UsageReader::default(), SerdeReader::default());
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                reader.feed(&bytes[from..cut]);
                reference.feed(&bytes[from..cut]);
                from = cut;
            }
            prop_assert_eq!(reader.found, reference.found, "{}", text);
        }

        /// A record written by hand is what serde_json writes for it, byte for byte.
        #[test]
        fn a_record_is_written_as_serde_json_writes_it(record in any_record()) {
            let mut written = Vec::new();
            record.write_json(&mut written);
            prop_assert_eq!(String::from_utf8(written).unwrap(), serde_json::to_string(&record).unwrap());
        }

        #[test]
        fn a_bounded_value_is_short_and_plain(value in ".*") {
            let shown = bounded(&value);
            prop_assert!(shown.len() <= MAX_LABEL_LEN);
            let odd = ['"', '\\', '\n', ' ', '{', '}'];
            prop_assert!(!shown.contains(odd), "{:?}", shown);
        }

        /// However the answer is cut into pieces, and whichever line ends it
        /// uses, the same usage is found and the same bytes pass.
        #[test]
        fn pieces_do_not_change_the_outcome(
            cuts in proptest::collection::vec(0usize..400, 0..12),
            eol in proptest::sample::select(vec!["\n", "\r", "\r\n"]),
        ) {
            let whole = with_line_ends(&stream(&["Hel", "lo", " \\\"usage\\\": world"], true), eol);
            let bytes = whole.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort();
            let mut reader = UsageReader::default();
            let mut unasked = UnaskedUsage::default();
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                reader.feed(&bytes[from..cut]);
                out.extend(unasked.pass(&bytes[from..cut], cut == bytes.len()));
                from = cut;
            }
            prop_assert_eq!(reader.usage(), Some(USAGE));
            prop_assert_eq!(unasked.usage(), Some(USAGE));
            let expected = with_line_ends(&stream(&["Hel", "lo", " \\\"usage\\\": world"], false), eol);
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }

        /// Partial counts merge field by field: a later count wins, a missing one keeps the earlier.
        #[test]
        fn partial_counts_merge_field_by_field(
            parts in proptest::collection::vec((proptest::option::of(0u64..1000), proptest::option::of(0u64..1000), any::<bool>()), 1..6),
        ) {
            let mut answer = String::new();
            let (mut input, mut output) = (None, None);
            for (prompt, completion, anthropic) in &parts {
                let (p, c) = if *anthropic { ("input_tokens", "output_tokens") } else { ("prompt_tokens", "completion_tokens") };
                let mut fields = Vec::new();
                fields.extend(prompt.map(|n| format!("\"{p}\":{n}")));
                fields.extend(completion.map(|n| format!("\"{c}\":{n}")));
                answer += &format!("data: {{\"usage\":{{{}}}}}\n\n", fields.join(","));
                input = prompt.or(input);
                output = completion.or(output);
            }
            let expected = (input.is_some() || output.is_some())
                .then(|| Usage { prompt_tokens: input.unwrap_or(0), completion_tokens: output.unwrap_or(0) });
            prop_assert_eq!(read_whole(answer.as_bytes()), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut reader = UsageReader::default();
            let mut unasked = UnaskedUsage::default();
            let n = pieces.len();
            for (i, piece) in pieces.iter().enumerate() {
                reader.feed(piece);
                let _ = unasked.pass(piece, i + 1 == n);
            }
        }
    }
}
