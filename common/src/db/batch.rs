//! Group commit: concurrent calls of one kind of write are collected into
//! one statement and one commit. A batch is whatever queued up while the
//! previous batches were being written, so a lone call goes out at once
//! (no timer, no added latency) and a busy system writes big batches.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::DbError;

/// The reply slot of one call.
type Waiter<Resp> = oneshot::Sender<Result<Resp, DbError>>;

/// A handle to one batching writer; cheap to clone.
pub struct Batcher<Req, Resp> {
    calls: mpsc::Sender<(Req, Waiter<Resp>)>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher {
            calls: self.calls.clone(),
        }
    }
}

impl<Req: Clone + Send + Sync + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the writer: at most `max_batch` calls per statement, at most
    /// `parallel` statements at once. `flush` must answer every request of
    /// a batch, in order, or fail the whole batch. A batch that fails on a
    /// data error (one row's data, not the database) is written again one
    /// call at a time, so that only the guilty call fails.
    pub fn spawn<F, Fut>(max_batch: usize, parallel: usize, flush: F) -> Self
    where
        F: Fn(Arc<[Req]>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<Resp, DbError>>, DbError>> + Send + 'static,
    {
        let (calls, mut incoming) =
            mpsc::channel::<(Req, Waiter<Resp>)>(max_batch.max(1) * parallel.max(1) * 4);
        let flush = Arc::new(flush);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            loop {
                // Wait for a free slot first, so calls pile up into one batch meanwhile.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = incoming.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match incoming.try_recv() {
                        Ok(call) => batch.push(call),
                        Err(_) => break,
                    }
                }
                let flush = flush.clone();
                tokio::spawn(async move {
                    write(&*flush, batch).await;
                    drop(slot);
                });
            }
        });
        Batcher { calls }
    }

    /// Submits one call and waits for its answer.
    pub async fn call(&self, request: Req) -> Result<Resp, DbError> {
        let (waiter, answer) = oneshot::channel();
        self.calls
            .send((request, waiter))
            .await
            .map_err(|_| DbError::BatchWriterGone)?;
        answer.await.map_err(|_| DbError::BatchWriterGone)?
    }
}

/// Writes one batch and answers each of its calls.
async fn write<Req, Resp, F, Fut>(flush: &F, batch: Vec<(Req, Waiter<Resp>)>)
where
    Req: Clone,
    F: Fn(Arc<[Req]>) -> Fut,
    Fut: Future<Output = Result<Vec<Result<Resp, DbError>>, DbError>>,
{
    let (requests, waiters): (Vec<Req>, Vec<Waiter<Resp>>) = batch.into_iter().unzip();
    let requests: Arc<[Req]> = requests.into();
    match flush(requests.clone()).await {
        Ok(answers) => {
            for (waiter, answer) in waiters.into_iter().zip(answers) {
                let _ = waiter.send(answer);
            }
        }
        Err(err) if err.is_data_error() && requests.len() > 1 => {
            for (request, waiter) in requests.iter().zip(waiters) {
                let single: Arc<[Req]> = Arc::from(vec![request.clone()]);
                let answer = match flush(single).await {
                    Ok(mut answers) => answers.pop().unwrap_or(Err(DbError::BatchWriterGone)),
                    Err(err) => Err(err),
                };
                let _ = waiter.send(answer);
            }
        }
        Err(err) => {
            // Every call of the batch gets the same cause, kept whole (not
            // flattened to a string): a pool timeout stays a pool timeout.
            let cause = Arc::new(err);
            for waiter in waiters {
                let _ = waiter.send(Err(DbError::Batch(cause.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let seen = sizes.clone();
        let batcher = Batcher::spawn(16, 1, move |requests: Arc<[u32]>| {
            seen.lock().unwrap().push(requests.len());
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(requests.iter().map(|n| Ok(n * 2)).collect())
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.call(n).await) })
            })
            .collect();
        for call in futures_join(calls.into_iter()).await {
            let (n, answer) = call;
            assert_eq!(answer.unwrap(), n * 2, "each call gets its own answer");
        }
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 100);
        assert!(
            sizes.iter().all(|&size| size <= 16),
            "no batch over the maximum: {sizes:?}"
        );
        assert!(sizes.len() < 100, "calls were batched: {sizes:?}");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_calls() {
        let batcher: Batcher<u32, u32> =
            Batcher::spawn(8, 1, |_| async { Err(DbError::Config("disk full".into())) });
        let err = batcher.call(1).await.unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[tokio::test]
    async fn a_data_error_fails_only_the_guilty_call() {
        let batcher = Batcher::spawn(64, 1, |requests: Arc<[u32]>| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if requests.contains(&13) {
                return Err(DbError::Corrupt {
                    task_id: "13".into(),
                    state: "bad".into(),
                });
            }
            Ok(requests.iter().map(|n| Ok(n + 1)).collect())
        });
        let calls: Vec<_> = (0..50u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.call(n).await) })
            })
            .collect();
        for (n, answer) in futures_join(calls.into_iter()).await {
            match answer {
                Ok(value) => assert_eq!(value, n + 1),
                Err(err) => {
                    assert_eq!(n, 13, "only the guilty call fails: {err}");
                    assert!(err.is_data_error());
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failed_batch_keeps_its_cause() {
        let batcher: Batcher<u32, u32> = Batcher::spawn(8, 1, |_| async {
            Err(DbError::Corrupt {
                task_id: "t".into(),
                state: "lost".into(),
            })
        });
        let err = batcher.call(1).await.unwrap_err();
        assert!(matches!(err, DbError::Batch(_)), "{err:?}");
        assert!(matches!(err.root(), DbError::Corrupt { .. }), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
    }

    async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::new();
        for handle in handles {
            out.push(handle.await.unwrap());
        }
        out
    }
}
