//! Stored responses and their wire format.
//!
//! A [`Record`] is what a backend keeps for a completed request: the response
//! (status, replayable headers, body) and the fingerprint of the request that
//! produced it. The in-memory backend keeps the struct itself; remote backends
//! store the bytes made by [`RecordCodec`]:
//!
//! ```text
//! +---------+-------+-----------------+--------------------------------------+
//! | version | flags | CRC-32 (LE, 4B) | MessagePack record, deflated if flag |
//! +---------+-------+-----------------+--------------------------------------+
//! ```
//!
//! The version is 1, or 2 for a record with trailers (which an instance
//! that reads only version 1 then refuses as a newer format, not as
//! corrupt). The CRC covers the flags and the payload, so a flipped bit or a truncated
//! value is a [`CodecError`] and never a replay of garbage. Inflating stops at
//! the configured maximum, so a small "deflate bomb" cannot exhaust memory.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, response};
use serde::{Deserialize, Serialize};

use crate::Fingerprint;
use crate::headers::strip_unreplayable;

/// A completed response, as stored and replayed.
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_idempotency::{Fingerprint, Record};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("content-type", HeaderValue::from_static("application/json"));
/// headers.insert("set-cookie", HeaderValue::from_static("session=abc"));
/// let record = Record::new(StatusCode::CREATED, headers, Bytes::from("{}"), Fingerprint::from_bytes([0; 32]));
/// assert!(record.headers.get("set-cookie").is_none(), "never replayed to another request");
/// assert_eq!(record.headers["content-type"], "application/json");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The response status.
    pub status: StatusCode,
    /// The response headers, without the ones that are never replayed
    /// (see [`Record::new`]).
    pub headers: HeaderMap,
    /// The whole response body.
    pub body: Bytes,
    /// The trailers the body ended with (a gRPC response's `grpc-status`,
    /// say), replayed after the body; `None` for a body without trailers.
    /// Boxed: most responses have none.
    pub trailers: Option<Box<HeaderMap>>,
    /// The fingerprint of the request that produced the response.
    pub fingerprint: Fingerprint,
    /// When the response was recorded.
    pub created_at: SystemTime,
    /// `false` for a "completed, response not kept" marker: the handler ran
    /// and answered with [`status`](Self::status), but the response could
    /// not be stored (too large, an event stream). Such a record has no
    /// headers and no body; a retry is answered with the
    /// [response not kept](crate::problem#response-not-kept) problem.
    pub kept: bool,
}

impl Record {
    /// Makes a record, dropping the headers that must never be replayed:
    /// `Set-Cookie` (a replay must not hand out a session), the hop-by-hop
    /// headers of RFC 9110 §7.6.1 and any header listed in `Connection`, and
    /// `Content-Length` (recomputed from the stored body on replay).
    #[must_use]
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        fingerprint: Fingerprint,
    ) -> Self {
        strip_unreplayable(&mut headers);
        Self {
            status,
            headers,
            body,
            trailers: None,
            fingerprint,
            created_at: now_millis(),
            kept: true,
        }
    }

    /// A "completed, response not kept" marker: the handler answered with
    /// `status`, but its response could not be stored.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_idempotency::{Fingerprint, Record};
    ///
    /// let marker = Record::not_kept(StatusCode::CREATED, Fingerprint::from_bytes([0; 32]));
    /// assert!(!marker.kept);
    /// assert!(marker.body.is_empty());
    /// ```
    #[must_use]
    pub fn not_kept(status: StatusCode, fingerprint: Fingerprint) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
            fingerprint,
            created_at: now_millis(),
            kept: false,
        }
    }

    /// The record with the trailers its body ended with, dropping the same
    /// fields [`Record::new`] drops from headers.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use tower_idempotency::{Fingerprint, Record};
    ///
    /// let mut trailers = HeaderMap::new();
    /// trailers.insert("grpc-status", HeaderValue::from_static("0"));
    /// let record = Record::new(StatusCode::OK, HeaderMap::new(), Bytes::new(), Fingerprint::from_bytes([0; 32]))
    ///     .with_trailers(trailers);
    /// assert_eq!(record.trailers.unwrap()["grpc-status"], "0");
    /// ```
    #[must_use]
    pub fn with_trailers(mut self, mut trailers: HeaderMap) -> Self {
        strip_unreplayable(&mut trailers);
        self.trailers = Some(Box::new(trailers));
        self
    }

    /// Makes a record from the parts of a response and its buffered body.
    #[must_use]
    pub fn from_parts(parts: &response::Parts, body: Bytes, fingerprint: Fingerprint) -> Self {
        Self::new(parts.status, parts.headers.clone(), body, fingerprint)
    }

    /// An estimate of the memory the record holds, in bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .chain(
                self.trailers
                    .as_deref()
                    .into_iter()
                    .flat_map(HeaderMap::iter),
            )
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 96
    }
}

/// Now, truncated to the millisecond precision records are stored with, so a
/// record reads back equal to what was written.
fn now_millis() -> SystemTime {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    UNIX_EPOCH + Duration::from_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Why stored bytes could not be turned back into a [`Record`].
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::{CodecError, Fingerprint, Record, RecordCodec};
///
/// let codec = RecordCodec::new();
/// let record = Record::new(StatusCode::OK, HeaderMap::new(), Bytes::from("paid"), Fingerprint::from_bytes([0; 32]));
/// let mut bytes = codec.encode(&record).unwrap();
/// *bytes.last_mut().unwrap() ^= 1;
/// assert!(matches!(codec.decode(&bytes), Err(CodecError::ChecksumMismatch)));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Fewer bytes than the fixed header.
    #[error("stored record is truncated ({len} bytes)")]
    Truncated {
        /// How many bytes there were.
        len: usize,
    },
    /// Written by a format version this crate does not know.
    #[error("stored record has unsupported format version {0}")]
    UnsupportedVersion(u8),
    /// Flags this crate does not know.
    #[error("stored record has unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// The checksum does not match: the bytes were altered or cut.
    #[error("stored record failed its checksum")]
    ChecksumMismatch,
    /// Larger than the configured maximum.
    #[error("record is larger than the maximum of {max} bytes")]
    TooLarge {
        /// The configured maximum.
        max: usize,
    },
    /// The payload could not be inflated.
    #[error("stored record could not be inflated")]
    Inflate(#[source] std::io::Error),
    /// The payload could not be encoded or decoded as a record.
    #[error("stored record is malformed: {0}")]
    Malformed(String),
}

/// The format of records without trailers, unchanged since the first.
const VERSION: u8 = 1;
/// Records with trailers. Versions that know only [`VERSION`] refuse them
/// as [`CodecError::UnsupportedVersion`] (the layer answers `503`, another
/// instance may read them), not as corrupt.
const VERSION_TRAILERS: u8 = 2;
const FLAG_DEFLATE: u8 = 0b0000_0001;
const HEADER_LEN: usize = 6;

/// Turns [`Record`]s into bytes and back, for backends that store bytes.
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::{Fingerprint, Record, RecordCodec};
///
/// let codec = RecordCodec::new();
/// let record = Record::new(
///     StatusCode::CREATED,
///     HeaderMap::new(),
///     Bytes::from_static(br#"{"id":1}"#),
///     Fingerprint::from_bytes([7; 32]),
/// );
/// let bytes = codec.encode(&record).unwrap();
/// assert_eq!(codec.decode(&bytes).unwrap(), record);
/// assert!(codec.decode(&bytes[..bytes.len() - 1]).is_err());
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RecordCodec {
    compress_above: usize,
    max_record_size: usize,
}

impl Default for RecordCodec {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Serialize)]
struct WireRef<'a> {
    status: u16,
    headers: Vec<(&'a str, &'a serde_bytes::Bytes)>,
    body: &'a serde_bytes::Bytes,
    fingerprint: &'a serde_bytes::Bytes,
    created_at_ms: u64,
    // Fields are written by position: these two are written only when
    // needed (a marker; a body with trailers, which needs `not_kept` before
    // it), so a kept record without trailers is encoded exactly as by the
    // versions before they existed, and those versions read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_kept: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trailers: Option<Vec<(&'a str, &'a serde_bytes::Bytes)>>,
}

#[derive(Deserialize)]
struct Wire {
    status: u16,
    headers: Vec<(String, serde_bytes::ByteBuf)>,
    body: serde_bytes::ByteBuf,
    fingerprint: serde_bytes::ByteBuf,
    created_at_ms: u64,
    #[serde(default)]
    not_kept: bool,
    #[serde(default)]
    trailers: Option<Vec<(String, serde_bytes::ByteBuf)>>,
}

impl RecordCodec {
    /// Deflates records whose MessagePack form exceeds 1 KiB; refuses to
    /// encode or inflate records larger than 8 MiB.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            compress_above: 1024,
            max_record_size: 8 * 1024 * 1024,
        }
    }

    /// Deflate records whose MessagePack form is larger than `bytes`.
    #[must_use]
    pub const fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = bytes;
        self
    }

    /// The largest record (uncompressed MessagePack) that is encoded or
    /// decoded; larger ones are [`CodecError::TooLarge`].
    #[must_use]
    pub const fn max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// Encodes a record.
    ///
    /// # Errors
    ///
    /// [`CodecError::TooLarge`] above the maximum record size.
    pub fn encode(&self, record: &Record) -> Result<Vec<u8>, CodecError> {
        let created_at_ms = record
            .created_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        let trailers = record.trailers.as_deref().map(fields);
        let wire = WireRef {
            status: record.status.as_u16(),
            headers: fields(&record.headers),
            body: serde_bytes::Bytes::new(&record.body),
            fingerprint: serde_bytes::Bytes::new(record.fingerprint.as_bytes()),
            created_at_ms: u64::try_from(created_at_ms).unwrap_or(u64::MAX),
            not_kept: (!record.kept || trailers.is_some()).then_some(!record.kept),
            trailers,
        };
        let version = if record.trailers.is_some() {
            VERSION_TRAILERS
        } else {
            VERSION
        };
        let mut out = vec![version, 0, 0, 0, 0, 0];
        rmp_serde::encode::write(&mut out, &wire)
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
        let plain_len = out.len() - HEADER_LEN;
        if plain_len > self.max_record_size {
            return Err(CodecError::TooLarge {
                max: self.max_record_size,
            });
        }
        if plain_len > self.compress_above {
            let deflated = deflate(&out[HEADER_LEN..])?;
            if deflated.len() < plain_len {
                let mut framed = Vec::with_capacity(HEADER_LEN + deflated.len());
                framed.extend_from_slice(&[version, FLAG_DEFLATE, 0, 0, 0, 0]);
                framed.extend_from_slice(&deflated);
                out = framed;
            }
        }
        let crc = checksum(out[1], &out[HEADER_LEN..]);
        out[2..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes bytes made by [`RecordCodec::encode`].
    ///
    /// # Errors
    ///
    /// A [`CodecError`] for truncated, altered, oversized or unknown input;
    /// never a panic.
    pub fn decode(&self, bytes: &[u8]) -> Result<Record, CodecError> {
        if bytes.len() < HEADER_LEN {
            return Err(CodecError::Truncated { len: bytes.len() });
        }
        if !matches!(bytes[0], VERSION | VERSION_TRAILERS) {
            return Err(CodecError::UnsupportedVersion(bytes[0]));
        }
        let flags = bytes[1];
        let payload = &bytes[HEADER_LEN..];
        let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        if checksum(flags, payload) != stored {
            return Err(CodecError::ChecksumMismatch);
        }
        let too_large = CodecError::TooLarge {
            max: self.max_record_size,
        };
        let wire: Wire = match flags {
            0 if payload.len() > self.max_record_size => return Err(too_large),
            0 => from_msgpack(payload)?,
            FLAG_DEFLATE => {
                let limit = u64::try_from(self.max_record_size).unwrap_or(u64::MAX);
                let mut plain = Vec::new();
                DeflateDecoder::new(payload)
                    .take(limit.saturating_add(1))
                    .read_to_end(&mut plain)
                    .map_err(CodecError::Inflate)?;
                if plain.len() > self.max_record_size {
                    return Err(too_large);
                }
                from_msgpack(&plain)?
            }
            other => return Err(CodecError::UnknownFlags(other)),
        };
        wire.into_record()
    }
}

fn deflate(plain: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut enc = DeflateEncoder::new(Vec::with_capacity(plain.len() / 2), Compression::fast());
    enc.write_all(plain)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    enc.finish()
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

fn checksum(flags: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[flags]);
    h.update(payload);
    h.finalize()
}

fn from_msgpack(bytes: &[u8]) -> Result<Wire, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))
}

impl Wire {
    fn into_record(self) -> Result<Record, CodecError> {
        let malformed = |what: &str| CodecError::Malformed(what.to_owned());
        let status = StatusCode::from_u16(self.status).map_err(|_| malformed("invalid status"))?;
        let fingerprint: [u8; 32] = self
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| malformed("fingerprint is not 32 bytes"))?;
        let headers = header_map(self.headers)?;
        let trailers = self.trailers.map(header_map).transpose()?.map(Box::new);
        Ok(Record {
            status,
            headers,
            body: Bytes::from(self.body.into_vec()),
            trailers,
            fingerprint: Fingerprint::from_bytes(fingerprint),
            created_at: UNIX_EPOCH + Duration::from_millis(self.created_at_ms),
            kept: !self.not_kept,
        })
    }
}

/// A header map as name and value pairs, in order.
fn fields(map: &HeaderMap) -> Vec<(&str, &serde_bytes::Bytes)> {
    map.iter()
        .map(|(n, v)| (n.as_str(), serde_bytes::Bytes::new(v.as_bytes())))
        .collect()
}

fn header_map(fields: Vec<(String, serde_bytes::ByteBuf)>) -> Result<HeaderMap, CodecError> {
    let malformed = |what: &str| CodecError::Malformed(what.to_owned());
    let mut map = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| malformed("invalid header name"))?;
        let value =
            HeaderValue::from_bytes(&value).map_err(|_| malformed("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn record(body: &[u8]) -> Record {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut r = Record::new(
            StatusCode::CREATED,
            headers,
            Bytes::copy_from_slice(body),
            Fingerprint::from_bytes([3; 32]),
        );
        r.created_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        r
    }

    #[test]
    fn large_compressible_records_are_deflated() {
        let codec = RecordCodec::new();
        let r = record(&vec![b'a'; 64 * 1024]);
        let bytes = codec.encode(&r).unwrap();
        assert_eq!(bytes[1], FLAG_DEFLATE);
        assert!(bytes.len() < 4096, "{}", bytes.len());
        assert_eq!(codec.decode(&bytes).unwrap(), r);
    }

    #[test]
    fn small_records_are_plain() {
        let codec = RecordCodec::new();
        let r = record(b"{}");
        let bytes = codec.encode(&r).unwrap();
        assert_eq!(bytes[1], 0);
        assert_eq!(codec.decode(&bytes).unwrap(), r);
    }

    #[test]
    fn inflate_is_bounded() {
        let big = RecordCodec::new();
        let bytes = big.encode(&record(&vec![0; 1024 * 1024])).unwrap();
        let small = RecordCodec::new().max_record_size(64 * 1024);
        assert!(matches!(
            small.decode(&bytes),
            Err(CodecError::TooLarge { max: 65536 })
        ));
        assert!(matches!(
            small.encode(&record(&vec![0; 100 * 1024])),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn markers_round_trip_and_kept_records_keep_the_first_format() {
        let codec = RecordCodec::new();
        let mut marker = Record::not_kept(StatusCode::CREATED, Fingerprint::from_bytes([4; 32]));
        marker.created_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(
            codec.decode(&codec.encode(&marker).unwrap()).unwrap(),
            marker
        );
        // A kept record is a five-element array, as before markers existed.
        let bytes = codec.encode(&record(b"{}")).unwrap();
        assert_eq!(bytes[HEADER_LEN], 0x95, "fixarray of 5");
        let bytes = codec.encode(&marker).unwrap();
        assert_eq!(bytes[HEADER_LEN], 0x96, "fixarray of 6");
    }

    #[test]
    fn trailers_round_trip_after_the_fields_before_them() {
        let codec = RecordCodec::new();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.append("x-cost", HeaderValue::from_static("1"));
        trailers.append("x-cost", HeaderValue::from_static("2"));
        let with = record(b"\0\0\0\0\x02hi").with_trailers(trailers);
        let bytes = codec.encode(&with).unwrap();
        assert_eq!(bytes[0], VERSION_TRAILERS);
        assert_eq!(bytes[HEADER_LEN], 0x97, "fixarray of 7");
        let back = codec.decode(&bytes).unwrap();
        assert_eq!(back, with);
        let values: Vec<_> = back
            .trailers
            .as_ref()
            .unwrap()
            .get_all("x-cost")
            .iter()
            .collect();
        assert_eq!(values, ["1", "2"], "order and multiplicity kept");
        // An empty trailer block is not the same as none.
        let empty = record(b"").with_trailers(HeaderMap::new());
        assert_eq!(codec.decode(&codec.encode(&empty).unwrap()).unwrap(), empty);
        // A marker with trailers keeps both.
        let mut marker = Record::not_kept(StatusCode::OK, Fingerprint::from_bytes([1; 32]));
        marker.trailers = Some(Box::default());
        assert_eq!(
            codec.decode(&codec.encode(&marker).unwrap()).unwrap(),
            marker
        );
    }

    #[test]
    fn unreplayable_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        let r = Record::new(
            StatusCode::OK,
            headers,
            Bytes::new(),
            Fingerprint::from_bytes([0; 32]),
        );
        assert_eq!(r.headers.len(), 1);
        assert!(r.headers.contains_key("x-keep"));
    }

    #[test]
    fn size_counts_body_headers_and_overheads() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("x-bb", HeaderValue::from_static("22"));
        let r = Record::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"abc"),
            Fingerprint::from_bytes([0; 32]),
        );
        // body 3 + (3 + 1 + 32) + (4 + 2 + 32) + 96
        assert_eq!(r.size(), 173);
    }

    #[test]
    fn records_are_stamped_now_to_the_millisecond() {
        let before = SystemTime::now() - Duration::from_secs(1);
        let r = record(b"{}");
        let r = Record::new(r.status, r.headers, r.body, r.fingerprint);
        let marker = Record::not_kept(StatusCode::OK, r.fingerprint);
        let after = SystemTime::now();
        for at in [r.created_at, marker.created_at] {
            assert!(before <= at && at <= after, "{at:?}");
            let since = at.duration_since(UNIX_EPOCH).unwrap();
            assert_eq!(since.subsec_nanos() % 1_000_000, 0, "{since:?}");
        }
    }

    /// The length of a record's MessagePack form (the size the limits see).
    fn plain_len(r: &Record) -> usize {
        let plain = RecordCodec::new()
            .compress_above(usize::MAX)
            .max_record_size(usize::MAX);
        let bytes = plain.encode(r).unwrap();
        assert_eq!(bytes[1], 0);
        bytes.len() - HEADER_LEN
    }

    #[test]
    fn the_size_limit_is_inclusive_on_both_sides_and_in_both_forms() {
        let r = record(&vec![b'a'; 4096]);
        let len = plain_len(&r);
        let at = |max: usize| RecordCodec::new().max_record_size(max);
        // Encoding: exactly the limit is kept, one byte over is refused.
        assert!(at(len).compress_above(usize::MAX).encode(&r).is_ok());
        assert!(matches!(
            at(len - 1).compress_above(usize::MAX).encode(&r),
            Err(CodecError::TooLarge { .. })
        ));
        // Decoding, plain and deflated.
        for compress_above in [usize::MAX, 0] {
            let bytes = RecordCodec::new()
                .compress_above(compress_above)
                .max_record_size(usize::MAX)
                .encode(&r)
                .unwrap();
            assert_eq!(bytes[1], u8::from(compress_above == 0) * FLAG_DEFLATE);
            assert_eq!(at(len).decode(&bytes).unwrap(), r);
            assert!(matches!(
                at(len - 1).decode(&bytes),
                Err(CodecError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn records_are_deflated_only_above_the_threshold() {
        let r = record(&vec![b'a'; 4096]);
        let len = plain_len(&r);
        let flag = |above: usize| RecordCodec::new().compress_above(above).encode(&r).unwrap()[1];
        assert_eq!(flag(len), 0);
        assert_eq!(flag(len - 1), FLAG_DEFLATE);
    }
}
