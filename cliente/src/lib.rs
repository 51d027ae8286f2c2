//! The Tareas command-line client, as a library: a connection speaking the
//! protocol ([`client`]), the demo run ([`demo`]), and the dead-letter
//! queue tools ([`dlq`]). `main.rs` is the CLI.

pub mod bench;
pub mod client;
pub mod demo;
pub use tareas_common::dlq;

pub use client::{Client, Endpoint};
