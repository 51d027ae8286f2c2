//! Result retention: every `TAREAS_RETENTION_INTERVAL`, the finished tasks
//! of this worker's queue older than `TAREAS_RESULT_TTL` lose their S3
//! object and then their row, 500 at a time, by one process at a time (the
//! others find the lock taken and skip the pass). `0` keeps everything.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// Tasks removed per transaction.
const BATCH: i64 = 500;

/// Runs retention passes until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    if ctx.result_ttl.is_zero() || ctx.retention_interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(ctx.retention_interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        pass(&ctx, &shutdown).await;
    }
}

/// Removes batches until fewer than a batch is left, the lock is taken, or
/// a store fails (the next pass tries again).
async fn pass(ctx: &Context, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        let s3 = &ctx.s3;
        let removed = ctx
            .db
            .expire_batch(
                &ctx.topology.queue,
                ctx.result_ttl,
                BATCH,
                |keys| async move {
                    for key in &keys {
                        s3.delete_result(key).await?;
                    }
                    Ok::<(), tareas_common::s3::S3Error>(())
                },
            )
            .await;
        match removed {
            Ok(Some(Ok(count))) => {
                if count > 0 {
                    tracing::info!(count, "removed finished tasks past TAREAS_RESULT_TTL");
                }
                if count < BATCH as usize {
                    return;
                }
            }
            // Another process is removing them.
            Ok(None) => return,
            Ok(Some(Err(err))) => {
                tracing::debug!(cause = %err, "retention: S3 is unavailable; next pass");
                return;
            }
            Err(err) => {
                tracing::debug!(cause = %err, "retention: PostgreSQL is unavailable; next pass");
                return;
            }
        }
    }
}
