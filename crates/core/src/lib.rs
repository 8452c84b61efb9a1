//! The few things every wrenn crate needs the same way, defined once:
//! - [`random`]: identifiers and tokens from the operating system's randomness (a failure is an
//!   error, never a constant or a clock-made value);
//! - [`now_ms`]: the wall clock in milliseconds since the Unix epoch;
//! - [`named_enum!`]: enums with names on the wire (states, kinds), their mapping written once;
//! - `logging` (with the `logging` feature): how the binaries log, to stderr.

#[cfg(feature = "logging")]
pub mod logging;
pub mod named;
pub mod random;

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
