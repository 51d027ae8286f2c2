//! Splits a byte stream into JSON objects, with or without newlines between
//! them. Many clients write `json.dumps(msg)` with no trailing newline, so a
//! frame ends where its object closes, not at a newline.
//!
//! The scanner follows JSON's grammar byte by byte (containers, keys,
//! colons, commas, strings and their escapes; scalars are left to the
//! parser), so it knows as soon as the bytes can no longer be a JSON object:
//! a truncated message never swallows the ones after it. It keeps its place
//! across reads, so each byte is looked at once.
//!
//! [`Framer`] is a `tokio_util::codec::Decoder`: a connection reads through
//! `FramedRead`, which owns the buffer. The buffer never holds more than
//! one message of at most `max_len` bytes plus one read.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// What the scanner found next in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete JSON object, syntactically sound as far as the scanner
    /// checks (scalars are checked by the parser), or the bytes of a broken
    /// one that ended where a new object plainly starts (the parser then
    /// says what is wrong).
    Object(Bytes),
    /// Bytes that cannot be, start or continue a JSON object; they are
    /// dropped up to the next newline. Carries the reason.
    Garbage(&'static str),
    /// An object longer than the limit. The stream cannot be resynchronised
    /// reliably after this, so the connection should be closed.
    TooLarge,
}

/// Where the scanner is between objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between objects: whitespace is skipped, `{` starts an object.
    Between,
    /// Inside an object, which starts at the front of the buffer.
    Object,
    /// Dropping bytes until the next newline.
    Skipping,
}

/// What the grammar allows next inside an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (after `:`, or after `,` in an array).
    Value,
    /// A value or `]` (just after `[`).
    ValueOrClose,
    /// A key (after `,` in an object).
    Key,
    /// A key or `}` (just after `{`).
    KeyOrClose,
    /// The `:` after a key.
    Colon,
    /// `,` or the close of the container, after a value.
    CommaOrClose,
}

/// Where a string being scanned is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InString {
    No,
    /// Inside a key; after it a `:` must come.
    Key,
    /// Inside a value.
    Value,
}

/// Incremental JSON-object splitter.
#[derive(Debug)]
pub struct Framer {
    /// Longest object accepted, in bytes.
    max_len: usize,
    mode: Mode,
    /// How far into the buffer the scan has got.
    scanned: usize,
    /// The open containers, innermost last: `true` for an object; at most
    /// [`MAX_DEPTH`].
    open: Vec<bool>,
    expect: Expect,
    string: InString,
    /// The previous byte was a backslash inside a string.
    escaped: bool,
    /// Inside a number or a literal (`true`, `false`, `null`).
    in_scalar: bool,
}

impl Decoder for Framer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.next_frame(buffer))
    }

    /// At the end of the stream, an unfinished object is answered
    /// `invalid_json` (the client may still read it) and dropped.
    fn decode_eof(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        if let Some(frame) = self.next_frame(buffer) {
            return Ok(Some(frame));
        }
        let unfinished = self.mode == Mode::Object;
        buffer.clear();
        self.mode = Mode::Between;
        self.scanned = 0;
        Ok(unfinished.then_some(Frame::Garbage("the input ended inside a JSON object")))
    }
}

impl Framer {
    pub fn new(max_len: usize) -> Framer {
        Framer {
            max_len,
            mode: Mode::Between,
            scanned: 0,
            open: Vec::new(),
            expect: Expect::KeyOrClose,
            string: InString::No,
            escaped: false,
            in_scalar: false,
        }
    }

    /// Bytes of `buffer` that belong to an unfinished object (0 between objects).
    pub fn pending_len(&self, buffer: &BytesMut) -> usize {
        if self.mode == Mode::Object {
            buffer.len()
        } else {
            0
        }
    }

    /// The next frame in what has been read so far, or `None` if more bytes are needed.
    fn next_frame(&mut self, buffer: &mut BytesMut) -> Option<Frame> {
        while self.scanned < buffer.len() {
            let byte = buffer[self.scanned];
            match self.mode {
                Mode::Between => {
                    if byte.is_ascii_whitespace() {
                        buffer.advance(1);
                    } else if byte == b'{' {
                        self.start_object();
                    } else {
                        self.mode = Mode::Skipping;
                        return Some(Frame::Garbage("expected a JSON object starting with '{'"));
                    }
                }
                Mode::Skipping => {
                    buffer.advance(1);
                    if byte == b'\n' {
                        self.mode = Mode::Between;
                    }
                }
                Mode::Object => {
                    if let Some(frame) = self.scan_object_byte(buffer, byte) {
                        return Some(frame);
                    }
                }
            }
        }
        None
    }

    fn start_object(&mut self) {
        self.mode = Mode::Object;
        self.scanned = 1;
        self.open.clear();
        self.open.push(true);
        self.expect = Expect::KeyOrClose;
        self.string = InString::No;
        self.escaped = false;
        self.in_scalar = false;
    }

    fn scan_object_byte(&mut self, buffer: &mut BytesMut, byte: u8) -> Option<Frame> {
        let at = self.scanned;
        self.scanned += 1;
        if self.scanned > self.max_len {
            return Some(self.too_large(buffer));
        }
        let step = if self.string != InString::No {
            self.string_byte(byte)
        } else {
            self.structural_byte(byte)
        };
        match step {
            Step::Continue => None,
            Step::Complete => {
                let object = buffer.split_to(self.scanned).freeze();
                self.mode = Mode::Between;
                self.scanned = 0;
                Some(Frame::Object(object))
            }
            // A `{` that cannot be here most likely starts the next message
            // of a client whose previous one was cut short: hand over the
            // broken bytes (the parser says what is wrong) and start anew.
            Step::Invalid(_) if byte == b'{' => {
                let broken = buffer.split_to(at).freeze();
                self.start_object();
                Some(Frame::Object(broken))
            }
            Step::Invalid(reason) => {
                buffer.advance(at);
                self.scanned = 0;
                self.mode = Mode::Skipping;
                Some(Frame::Garbage(reason))
            }
        }
    }

    /// One byte inside a string literal.
    fn string_byte(&mut self, byte: u8) -> Step {
        if self.escaped {
            self.escaped = false;
            return match byte {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' | b'u' => Step::Continue,
                _ => Step::Invalid("not a JSON object: invalid escape in a string"),
            };
        }
        match byte {
            b'\\' => self.escaped = true,
            b'"' => {
                self.expect = if self.string == InString::Key {
                    Expect::Colon
                } else {
                    Expect::CommaOrClose
                };
                self.string = InString::No;
            }
            0..=0x1f => {
                return Step::Invalid(
                    "not a JSON object: a string holds a raw control character (a line break?)",
                )
            }
            _ => {}
        }
        Step::Continue
    }

    /// One byte outside strings: the grammar of containers, keys and values.
    fn structural_byte(&mut self, byte: u8) -> Step {
        if self.in_scalar {
            if is_scalar_byte(byte) {
                return Step::Continue;
            }
            self.in_scalar = false;
            self.expect = Expect::CommaOrClose;
        }
        let expect = self.expect;
        let value = matches!(expect, Expect::Value | Expect::ValueOrClose);
        let in_object = self.open.last() == Some(&true);
        match byte {
            b' ' | b'\t' | b'\r' | b'\n' => Step::Continue,
            b'"' if value => self.enter_string(InString::Value),
            b'"' if matches!(expect, Expect::Key | Expect::KeyOrClose) => {
                self.enter_string(InString::Key)
            }
            b':' if expect == Expect::Colon => self.then(Expect::Value),
            b',' if expect == Expect::CommaOrClose => self.then(if in_object {
                Expect::Key
            } else {
                Expect::Value
            }),
            b'{' if value => self.open(true, Expect::KeyOrClose),
            b'[' if value => self.open(false, Expect::ValueOrClose),
            b'}' if in_object && matches!(expect, Expect::KeyOrClose | Expect::CommaOrClose) => {
                self.close()
            }
            b']' if !in_object && matches!(expect, Expect::ValueOrClose | Expect::CommaOrClose) => {
                self.close()
            }
            _ if value && is_scalar_byte(byte) => {
                self.in_scalar = true;
                Step::Continue
            }
            _ => Step::Invalid(
                "not a JSON object: a byte where JSON allows none (truncated or malformed message)",
            ),
        }
    }

    fn enter_string(&mut self, string: InString) -> Step {
        self.string = string;
        Step::Continue
    }

    fn then(&mut self, expect: Expect) -> Step {
        self.expect = expect;
        Step::Continue
    }

    fn open(&mut self, object: bool, expect: Expect) -> Step {
        if self.open.len() >= MAX_DEPTH {
            return Step::Invalid("not a request: nested deeper than 128 levels");
        }
        self.open.push(object);
        self.then(expect)
    }

    fn close(&mut self) -> Step {
        self.open.pop();
        if self.open.is_empty() {
            return Step::Complete;
        }
        self.then(Expect::CommaOrClose)
    }

    fn too_large(&mut self, buffer: &mut BytesMut) -> Frame {
        buffer.advance(self.scanned);
        self.scanned = 0;
        self.mode = Mode::Skipping;
        Frame::TooLarge
    }
}

/// Deepest nesting accepted (serde_json's own limit): it also bounds the
/// scanner's stack.
const MAX_DEPTH: usize = 128;

/// What one byte did to the object being scanned.
enum Step {
    Continue,
    /// It closed the outermost object.
    Complete,
    /// The bytes can no longer be a JSON object; why.
    Invalid(&'static str),
}

/// Bytes of numbers and of `true`, `false`, `null` (the parser checks which).
fn is_scalar_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'+' | b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max_len: usize) -> Vec<Frame> {
        let mut framer = Framer::new(max_len);
        let mut buffer = BytesMut::from(input);
        std::iter::from_fn(|| framer.next_frame(&mut buffer)).collect()
    }

    fn object(text: &str) -> Frame {
        Frame::Object(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn splits_with_and_without_newlines() {
        assert_eq!(
            frames(br#"{"a":1}{"b":"}{"}  {"c":[{"d":2}]}"#, 1024),
            vec![
                object(r#"{"a":1}"#),
                object(r#"{"b":"}{"}"#),
                object(r#"{"c":[{"d":2}]}"#)
            ]
        );
        assert_eq!(
            frames(b"{\"a\":1}\n\r\n{\"b\":2}\n", 1024),
            vec![object(r#"{"a":1}"#), object(r#"{"b":2}"#)]
        );
    }

    #[test]
    fn escapes_inside_strings() {
        assert_eq!(
            frames(br#"{"a":"\"}\\"}"#, 1024),
            vec![object(r#"{"a":"\"}\\"}"#)]
        );
    }

    #[test]
    fn feeds_byte_by_byte() {
        let input = br#"{"type":"ping"} {"type":"status","task_id":"x"}"#;
        let mut framer = Framer::new(1024);
        let mut buffer = BytesMut::new();
        let mut found = Vec::new();
        for byte in input {
            buffer.extend_from_slice(&[*byte]);
            while let Some(frame) = framer.next_frame(&mut buffer) {
                found.push(frame);
            }
        }
        assert_eq!(
            found,
            vec![
                object(r#"{"type":"ping"}"#),
                object(r#"{"type":"status","task_id":"x"}"#)
            ]
        );
    }

    #[test]
    fn garbage_skips_to_the_next_line() {
        let found = frames(b"hola {x}\n{\"a\":1}", 1024);
        assert!(matches!(found[0], Frame::Garbage(_)));
        assert_eq!(found[1..], [object(r#"{"a":1}"#)]);
    }

    #[test]
    fn an_unclosed_object_does_not_swallow_the_next() {
        let found = frames(b"{\"a\":1\n{\"type\":\"ping\"}\n", 1024);
        assert_eq!(
            found,
            vec![object("{\"a\":1\n"), object(r#"{"type":"ping"}"#)]
        );
    }

    #[test]
    fn too_large_then_resumes_after_newline() {
        let mut input = b"{\"a\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\"}\n{\"b\":1}");
        assert_eq!(
            frames(&input, 50),
            vec![Frame::TooLarge, object(r#"{"b":1}"#)]
        );
    }

    #[test]
    fn pending_is_bounded() {
        let mut framer = Framer::new(64);
        let mut buffer = BytesMut::from(&b"{\"a\":\""[..]);
        buffer.extend_from_slice(&[b'x'; 100]);
        assert_eq!(framer.next_frame(&mut buffer), Some(Frame::TooLarge));
        assert_eq!(framer.pending_len(&buffer), 0);
    }
}

/// Fuzzing the framer and the request parser with arbitrary byte streams.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use tareas_common::protocol::Request;

    use super::*;

    /// Runs `input` through a framer in the given chunk sizes, and through
    /// the request parser, like a connection does.
    pub(super) fn run(input: &[u8], chunks: &[usize], max_len: usize) -> Vec<Frame> {
        let mut framer = Framer::new(max_len);
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        let mut rest = input;
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let size = sizes.next().unwrap_or(1).clamp(1, rest.len());
            buffer.extend_from_slice(&rest[..size]);
            rest = &rest[size..];
            while let Some(frame) = framer.next_frame(&mut buffer) {
                if let Frame::Object(bytes) = &frame {
                    // Never panics; an error always has a code and a message.
                    if let Err(err) = Request::parse(bytes) {
                        assert!(!err.message.is_empty());
                    }
                }
                frames.push(frame);
            }
            assert!(
                framer.pending_len(&buffer) <= max_len + size,
                "held bytes stay bounded"
            );
        }
        frames
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_any_chunking_same_frames(
            input in proptest::collection::vec(any::<u8>(), 0..2048),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let whole = run(&input, &[input.len().max(1)], 256);
            let pieces = run(&input, &chunks, 256);
            prop_assert_eq!(whole, pieces);
        }

        #[test]
        fn json_like_noise_never_panics(
            input in proptest::collection::vec(prop::sample::select(b"{}[]\":,\\ \nab1".to_vec()), 0..1024),
            chunks in proptest::collection::vec(1usize..16, 1..4),
        ) {
            run(&input, &chunks, 128);
        }

        #[test]
        fn every_garbage_line_gets_one_error_and_requests_survive(
            lines in proptest::collection::vec(
                prop_oneof![
                    "[a-zA-Z0-9 ,.:!?\\]\\[-]{0,40}".prop_map(|noise| format!("x{noise}\n")),
                    "[a-z]{1,10}".prop_map(|text| format!("{{\"type\":\"status\",\"task_id\":\"{text}\"}}")),
                ],
                0..40,
            ),
            chunks in proptest::collection::vec(1usize..32, 1..4),
        ) {
            let input: String = lines.concat();
            let frames = run(input.as_bytes(), &chunks, 1024);
            let garbage = lines.iter().filter(|line| line.starts_with('x')).count();
            let requests: Vec<&String> = lines.iter().filter(|line| line.starts_with('{')).collect();
            prop_assert_eq!(frames.iter().filter(|f| matches!(f, Frame::Garbage(_))).count(), garbage);
            let parsed: Vec<Request> = frames
                .iter()
                .filter_map(|f| match f { Frame::Object(bytes) => Some(Request::parse(bytes).expect("valid request")), _ => None })
                .collect();
            prop_assert_eq!(parsed.len(), requests.len());
        }
    }
}

/// The framer against a real JSON parser: a proper prefix of a valid
/// message, a newline, then a valid message.
#[cfg(test)]
mod oracle {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    /// Nested objects and arrays with strings holding braces, quotes and escapes.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|x| json!(x)),
            "[a-z{}\\[\\]\":,\\\\ /é\u{1F600}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z{}\":]{0,6}", inner, 0..5)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::btree_map("[a-z{}\":]{1,6}", value(), 1..5).prop_map(|map| {
            serde_json::to_vec(&Value::Object(map.into_iter().collect())).expect("json")
        })
    }

    fn frames(input: &[u8], chunks: &[usize]) -> Vec<Frame> {
        super::fuzz::run(input, chunks, 1 << 16)
    }

    /// Whether a frame is answered `invalid_json` by the connection.
    fn is_invalid(frame: &Frame) -> bool {
        match frame {
            Frame::Garbage(_) => true,
            Frame::Object(bytes) => serde_json::from_slice::<Value>(bytes).is_err(),
            Frame::TooLarge => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn whole_objects_split_anywhere_come_out_whole(
            messages in proptest::collection::vec(object(), 1..5),
            newline in any::<bool>(),
            chunks in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let separator: &[u8] = if newline { b"\n" } else { b"" };
            let input = messages.join(separator);
            let expected: Vec<Frame> = messages
                .iter()
                .map(|m| Frame::Object(Bytes::copy_from_slice(m)))
                .collect();
            prop_assert_eq!(frames(&input, &chunks), expected);
        }

        #[test]
        fn a_truncated_message_is_invalid_where_the_parser_says_so(
            first in object(),
            cut in any::<prop::sample::Index>(),
            next in object(),
            chunks in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let prefix = &first[..1 + cut.index(first.len() - 1)];
            let mut input = prefix.to_vec();
            input.push(b'\n');
            input.extend_from_slice(&next);
            let found = frames(&input, &chunks);
            match serde_json::from_slice::<Value>(&input) {
                // Still a valid beginning (the prefix ended after `:`, `[`
                // or `,` in an array, and took the next object as a value):
                // JSON allows it, the framer waits.
                Err(err) if err.is_eof() => prop_assert_eq!(found, vec![]),
                Err(_) => {
                    prop_assert_eq!(found.len(), 2, "{:?}", found);
                    prop_assert!(is_invalid(&found[0]), "{:?}", found);
                    prop_assert_eq!(&found[1], &Frame::Object(Bytes::copy_from_slice(&next)));
                }
                Ok(_) => prop_assert!(false, "a proper prefix plus an object parsed whole"),
            }
        }
    }

    #[test]
    fn a_truncated_task_does_not_swallow_the_ping_after_it() {
        let found = frames(b"{\"type\": \"task\", \n{\"type\":\"ping\"}", &[64]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(is_invalid(&found[0]));
        assert_eq!(
            found[1],
            Frame::Object(Bytes::from_static(b"{\"type\":\"ping\"}"))
        );
    }

    #[test]
    fn the_end_of_input_inside_an_object_is_invalid() {
        let mut framer = Framer::new(1024);
        let mut buffer = BytesMut::from(&b"{\"type\":\"pi"[..]);
        assert_eq!(framer.decode(&mut buffer).expect("decode"), None);
        let last = framer.decode_eof(&mut buffer).expect("decode_eof");
        assert!(matches!(last, Some(Frame::Garbage(_))), "{last:?}");
        assert_eq!(framer.decode_eof(&mut buffer).expect("decode_eof"), None);
    }
}
