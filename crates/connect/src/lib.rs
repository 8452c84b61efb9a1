//! The Connect RPC protocol (<https://connectrpc.com/docs/protocol>) as wrenn speaks it: the pieces
//! both servers and clients need, with no opinion about routing or services.
//!
//! - [`Code`] and [`ConnectError`]: the error model, its JSON wire form and the code→HTTP mapping.
//! - [`Codec`]: the JSON (proto3 JSON mapping) and binary protobuf codecs, chosen by content type.
//! - [`envelope`]: the 5-byte envelope of streaming calls and an incremental, size-bounded decoder.
//! - [`server`]: reading a request's protocol headers and building unary and streaming responses.
//! - [`client`]: a small client for unary and server-streaming calls over HTTP/1.1 or h2c.
//!
//! It owns no service logic: envd and the host agent put their handlers on top.

pub mod client;
mod code;
mod codec;
pub mod envelope;
mod error;
pub mod server;

pub use code::Code;
pub use codec::{Codec, CodecError, Message};
pub use error::ConnectError;

/// The largest message (and envelope payload) accepted by default: 4 MiB. Requests to envd are
/// small (commands, paths); file contents travel over the plain `/files` routes instead.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
