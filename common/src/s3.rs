//! The result bucket in S3: path-style, SigV4, any S3-compatible server
//! (MinIO, s3s-fs, AWS). Behind the `s3` feature: the worker writes it,
//! the bench measures it, the distribuidor never links it.

use std::time::Duration;

use crate::config::S3Args;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

/// A failed S3 call, with the operation it was.
#[derive(Debug, thiserror::Error)]
#[error("S3 {operation} failed: {message}")]
pub struct S3Error {
    pub operation: &'static str,
    pub message: String,
}

impl S3Error {
    fn new<E: std::error::Error>(operation: &'static str, err: E) -> S3Error {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        S3Error { operation, message }
    }
}

/// A result document's bytes, shared rather than copied between retries.
pub type Document = bytes::Bytes;

/// The result bucket.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
}

impl S3Store {
    pub fn new(args: &S3Args) -> S3Store {
        let credentials = Credentials::new(
            &args.aws_access_key_id,
            &args.aws_secret_access_key,
            None,
            None,
            "tareas",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&args.s3_endpoint)
            .region(Region::new(args.aws_region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            )
            .build();
        S3Store {
            client: Client::from_conf(config),
            bucket: args.s3_bucket.clone(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key of a task's result document.
    pub fn key(task_id: &str) -> String {
        format!("results/{task_id}.json")
    }

    /// Creates the bucket unless it exists.
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created S3 bucket");
                Ok(())
            }
            Err(err) => {
                let service = err.as_service_error();
                if service.is_some_and(|e| {
                    e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists()
                }) {
                    Ok(())
                } else {
                    Err(S3Error::new("CreateBucket", err))
                }
            }
        }
    }

    /// Writes a task's result document.
    /// `document` is `Bytes`, so a write retried after an outage shares its
    /// bytes instead of copying them.
    pub async fn put_result(&self, task_id: &str, document: Document) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(Self::key(task_id))
            .content_type("application/json")
            .body(ByteStream::from(document))
            .send()
            .await
            .map_err(|err| S3Error::new("PutObject", err))?;
        Ok(())
    }

    /// Reads a task's result document, if there is one (for tests and tools).
    pub async fn get_result(&self, task_id: &str) -> Result<Option<Vec<u8>>, S3Error> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(Self::key(task_id))
            .send()
            .await
        {
            Ok(object) => {
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|err| S3Error::new("GetObject", err))?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }
            Err(err) if err.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(err) => Err(S3Error::new("GetObject", err)),
        }
    }

    /// Deletes a task's result document (for tools: the bench's scratch objects).
    pub async fn delete_result(&self, task_id: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(Self::key(task_id))
            .send()
            .await
            .map_err(|err| S3Error::new("DeleteObject", err))?;
        Ok(())
    }
}
