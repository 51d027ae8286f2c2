//! The Tareas command-line client, as a library: a connection speaking the
//! protocol ([`client`]) and the demo run ([`demo`]). `main.rs` is the CLI.

pub mod client;
pub mod demo;

pub use client::Client;
