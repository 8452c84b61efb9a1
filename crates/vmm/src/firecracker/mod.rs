//! The Firecracker backend: its API client ([`api`]); the page server that serves a restored
//! VM's memory is [`crate::uffd`].

pub mod api;
