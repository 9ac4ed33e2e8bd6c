//! Plain HTTP/1.1 pass-through: the framing rules for requests that are not upgrades.
//!
//! On the same listeners as WebSocket upgrades, the proxy also forwards ordinary HTTP/1.1
//! requests and their responses. It rewrites heads but never bodies: a body goes through in
//! wire form, chunk-size lines and trailers included. What the proxy must get exactly right is
//! where each body ends, since the bytes after it are the next request (or response) on a
//! kept-alive connection; a proxy that reads a body's end differently from the upstream lets a
//! client smuggle a request past it.
//!
//! [`request_framing`] and [`response_framing`] decide a message's [`Framing`] from its head
//! (RFC 9112 §6), refusing heads that could be read two ways. [`BodyReader`] then follows one
//! body through the stream, validating chunked framing strictly (RFC 9112 §7.1) before it
//! passes anything on. Both are sans-IO.

mod body;
mod framing;
mod response;
mod syntax;

pub use body::{BodyError, BodyLimits, BodyReader, Fed};
pub use framing::{
    request_framing, response_framing, Framing, RequestFramingError, ResponseFramingError,
};
pub use response::{parse_response_head, ResponseHead};
