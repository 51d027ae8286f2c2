//! Where results go: PostgreSQL (the `tasks` row, via [`tareas_common::db`])
//! and S3 (`results/<task_id>.json`). The S3 object is the finished row as
//! JSON, a pure function of the row, so writing it again writes the same bytes.

pub mod s3;
