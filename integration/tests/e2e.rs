//! End-to-end tests: the real distribuidor and workers, in-process, against
//! the real RabbitMQ, PostgreSQL and S3 server (`scripts/services`).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod auth;
mod bad_input;
mod bench_smoke;
mod crash;
mod dashboard;
mod deployment;
mod hostile;
mod http;
mod limits;
mod metrics;
mod operator;
mod pipeline;
mod recovery;
mod reliability;
mod retention;
mod scaling;
mod slots;
mod tls;
mod traces;
