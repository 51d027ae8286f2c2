//! Splits a byte stream into JSON objects, with or without newlines between
//! them. Many clients write `json.dumps(msg)` with no trailing newline, so a
//! frame ends where its object's braces balance, not at a newline.
//!
//! [`Framer`] is a `tokio_util::codec::Decoder`: a connection reads through
//! `FramedRead`, which owns the buffer. The scanner keeps its place across
//! reads, so each byte is looked at once, and the buffer never holds more
//! than one message of at most `max_len` bytes plus one read.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// What the scanner found next in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete, brace-balanced object (it may still be invalid JSON).
    Object(Bytes),
    /// Bytes that cannot start or continue an object; they are dropped up
    /// to the next newline. Carries the reason.
    Garbage(&'static str),
    /// An object longer than the limit. The stream cannot be resynchronised
    /// reliably after this, so the connection should be closed.
    TooLarge,
}

/// Where the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between objects: whitespace is skipped, `{` starts an object.
    Between,
    /// Inside an object, which starts at the front of the buffer.
    Object,
    /// Dropping bytes until the next newline.
    Skipping,
}

/// Incremental JSON-object splitter.
#[derive(Debug)]
pub struct Framer {
    /// Longest object accepted, in bytes.
    max_len: usize,
    mode: Mode,
    /// How far into the buffer the scan has got.
    scanned: usize,
    /// Brace/bracket nesting depth inside the current object.
    depth: usize,
    /// Inside a string literal.
    in_string: bool,
    /// The previous byte was a backslash inside a string.
    escaped: bool,
    /// The last byte outside strings that was not whitespace.
    last_significant: u8,
}

impl Decoder for Framer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.next_frame(buffer))
    }

    /// At the end of the stream an unfinished object is dropped: the client
    /// is gone, nobody would read its error.
    fn decode_eof(&mut self, buffer: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        let frame = self.next_frame(buffer);
        if frame.is_none() {
            buffer.clear();
            self.mode = Mode::Between;
            self.scanned = 0;
        }
        Ok(frame)
    }
}

impl Framer {
    pub fn new(max_len: usize) -> Framer {
        Framer {
            max_len,
            mode: Mode::Between,
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            last_significant: 0,
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
        self.depth = 1;
        self.in_string = false;
        self.escaped = false;
        self.last_significant = b'{';
    }

    fn scan_object_byte(&mut self, buffer: &mut BytesMut, byte: u8) -> Option<Frame> {
        let at = self.scanned;
        self.scanned += 1;
        if self.scanned > self.max_len {
            return Some(self.too_large(buffer));
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            return None;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                // A value may only follow `[`, `,` or `:`. Anything else means
                // the object so far is broken (say, a line missing its closing
                // brace) and this `{` probably starts the next message.
                if byte == b'{' && !matches!(self.last_significant, b'[' | b',' | b':') {
                    let broken = buffer.split_to(at).freeze();
                    self.start_object();
                    return Some(Frame::Object(broken));
                }
                self.depth += 1;
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    let object = buffer.split_to(self.scanned).freeze();
                    self.mode = Mode::Between;
                    self.scanned = 0;
                    return Some(Frame::Object(object));
                }
            }
            _ => {}
        }
        if !byte.is_ascii_whitespace() {
            self.last_significant = byte;
        }
        None
    }

    fn too_large(&mut self, buffer: &mut BytesMut) -> Frame {
        buffer.advance(self.scanned);
        self.scanned = 0;
        self.mode = Mode::Skipping;
        Frame::TooLarge
    }
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
    fn run(input: &[u8], chunks: &[usize], max_len: usize) -> Vec<Frame> {
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
