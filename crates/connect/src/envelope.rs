//! The envelope of Connect streaming calls: `[flags: u8][length: u32 big-endian][payload]`.
//!
//! Flag `0x01` marks a compressed payload (wrenn negotiates no compression, so it is refused) and
//! `0x02` the end-stream message that closes every streaming response. [`EnvelopeDecoder`] parses
//! envelopes incrementally from arbitrarily split chunks and refuses a payload larger than its
//! limit *before* buffering it, so a hostile length prefix cannot make it allocate.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The payload is compressed.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// The envelope is the end-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// The size of the envelope prefix.
pub const PREFIX_LEN: usize = 5;

/// One envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Why a byte stream is not a valid sequence of envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside an envelope ({buffered} bytes of an incomplete envelope)")]
    Truncated { buffered: usize },
    #[error("compressed messages are not supported (no compression was negotiated)")]
    Compressed,
    #[error("unknown envelope flags {0:#04x}")]
    UnknownFlags(u8),
}

/// Encodes one envelope.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).expect("envelope payloads are below 4 GiB"));
    out.put_slice(payload);
    out.freeze()
}

/// An incremental envelope parser with a size limit.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buffer: BytesMut,
    max_payload: usize,
}

impl EnvelopeDecoder {
    pub fn new(max_payload: usize) -> Self {
        EnvelopeDecoder {
            buffer: BytesMut::new(),
            max_payload,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete envelope, `Ok(None)` when more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buffer.len() < PREFIX_LEN {
            return Ok(None);
        }
        let flags = self.buffer[0];
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if flags & !(FLAG_COMPRESSED | FLAG_END_STREAM) != 0 {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > self.max_payload {
            return Err(EnvelopeError::TooLarge {
                len,
                max: self.max_payload,
            });
        }
        if self.buffer.len() < PREFIX_LEN + len {
            self.buffer.reserve(PREFIX_LEN + len - self.buffer.len());
            return Ok(None);
        }
        self.buffer.advance(PREFIX_LEN);
        let payload = self.buffer.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Call at the end of the input: an incomplete envelope left over is an error.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated {
                buffered: self.buffer.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(chunks: &[&[u8]], max: usize) -> Result<Vec<Envelope>, EnvelopeError> {
        let mut decoder = EnvelopeDecoder::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(envelope) = decoder.next_envelope()? {
                out.push(envelope);
            }
        }
        decoder.finish()?;
        Ok(out)
    }

    #[test]
    fn encodes_prefix_big_endian() {
        assert_eq!(
            &encode(FLAG_END_STREAM, b"{}")[..],
            &[2, 0, 0, 0, 2, b'{', b'}']
        );
        assert_eq!(&encode(0, b"")[..], &[0, 0, 0, 0, 0]);
    }

    #[test]
    fn refuses_oversized_before_buffering() {
        let mut decoder = EnvelopeDecoder::new(10);
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decoder.next_envelope(),
            Err(EnvelopeError::TooLarge {
                len: u32::MAX as usize,
                max: 10
            })
        );
    }

    #[test]
    fn refuses_compression_and_unknown_flags() {
        assert_eq!(
            decode_all(&[&encode(FLAG_COMPRESSED, b"x")], 10),
            Err(EnvelopeError::Compressed)
        );
        assert_eq!(
            decode_all(&[&encode(0x80, b"x")], 10),
            Err(EnvelopeError::UnknownFlags(0x80))
        );
    }

    #[test]
    fn truncated_input_is_an_error() {
        let full = encode(0, b"hello");
        assert_eq!(
            decode_all(&[&full[..7]], 10),
            Err(EnvelopeError::Truncated { buffered: 7 })
        );
        assert_eq!(
            decode_all(&[&full[..3]], 10),
            Err(EnvelopeError::Truncated { buffered: 3 })
        );
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut wire = Vec::new();
            for (i, payload) in payloads.iter().enumerate() {
                let flags = if i + 1 == payloads.len() { FLAG_END_STREAM } else { 0 };
                wire.extend_from_slice(&encode(flags, payload));
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| if wire.is_empty() { 0 } else { c % wire.len() }).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for point in points {
                chunks.push(&wire[start..point]);
                start = point;
            }
            chunks.push(&wire[start..]);
            let decoded = decode_all(&chunks, 300).unwrap();
            prop_assert_eq!(decoded.len(), payloads.len());
            for (envelope, payload) in decoded.iter().zip(&payloads) {
                prop_assert_eq!(&envelope.payload[..], &payload[..]);
            }
            if let Some(last) = decoded.last() {
                prop_assert!(last.is_end_stream());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..32) {
            let _ = decode_all(&[&bytes], max);
        }

        #[test]
        fn payload_over_limit_is_refused(extra in 1usize..100, max in 0usize..100) {
            let payload = vec![7u8; max + extra];
            let result = decode_all(&[&encode(0, &payload)], max);
            prop_assert_eq!(result, Err(EnvelopeError::TooLarge { len: max + extra, max }));
        }
    }
}
