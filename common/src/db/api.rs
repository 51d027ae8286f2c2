//! The HTTP API's reads: a page of a client's tasks, newest first, and the
//! keys of tasks as they finish (`LISTEN tareas_finished`, sent by a
//! trigger when a row becomes terminal: migration 0004).

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Socket};
use tokio_util::sync::CancellationToken;

use super::rows::TaskRow;
use super::{Db, DbError};
use crate::backoff::Backoff;

/// Whose tasks a listing shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Scope {
    /// The anonymous scope: keys without `/`.
    #[default]
    Anonymous,
    /// One client's: keys that begin with `<client>/`.
    Client(String),
    /// Every client's (operators).
    All,
}

/// Which tasks a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub scope: Scope,
    /// Only the task with this id (in any scope the listing shows).
    pub task_id: Option<String>,
    /// Only tasks in this state.
    pub state: Option<String>,
    /// Only tasks of this type.
    pub task_type: Option<String>,
    /// Only tasks of this work queue (a dashboard shows its distribuidor's).
    pub queue: Option<String>,
    /// At most this many rows.
    pub limit: i64,
    /// Rows strictly older than this (`created_at`, key), from the last
    /// row of the previous page.
    pub after: Option<(String, String)>,
}

impl Db {
    /// One page of tasks, newest first; the position after its last row
    /// when there may be more.
    pub async fn list(
        &self,
        listing: &Listing,
    ) -> Result<(Vec<TaskRow>, Option<(String, String)>), DbError> {
        let client = self.pool.get().await?;
        // '': every key; '/': keys without one; 'name/': that client's.
        let prefix = match &listing.scope {
            Scope::All => String::new(),
            Scope::Anonymous => "/".to_owned(),
            Scope::Client(name) => format!("{name}/"),
        };
        let (after_at, after_key) = listing.after.clone().unzip();
        let rows = client
            .query(
                "SELECT to_jsonb(tasks), created_at::text FROM tasks
                 WHERE CASE $1::text WHEN '' THEN true
                                     WHEN '/' THEN strpos(task_id, '/') = 0
                                     ELSE starts_with(task_id, $1) END
                   AND ($2::text IS NULL OR state = $2)
                   AND ($3::text IS NULL OR task_type = $3)
                   AND ($4::text IS NULL OR (created_at, task_id) < ($4::timestamptz, $5::text))
                   AND ($7::text IS NULL OR task_id = $7
                        OR (strpos(task_id, '/') > 0 AND substr(task_id, strpos(task_id, '/') + 1) = $7))
                   AND ($8::text IS NULL OR queue = $8)
                 ORDER BY created_at DESC, task_id DESC
                 LIMIT $6",
                &[
                    &prefix,
                    &listing.state,
                    &listing.task_type,
                    &after_at,
                    &after_key,
                    &listing.limit,
                    &listing.task_id,
                    &listing.queue,
                ],
            )
            .await?;
        let mut page = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let json: serde_json::Value = row.try_get(0)?;
            let key = json["task_id"].as_str().unwrap_or_default().to_owned();
            let created_at: String = row.try_get(1)?;
            page.push(TaskRow::from_json(&key, json)?);
            last = Some((created_at, key));
        }
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= listing.limit;
        Ok((page, last.filter(|_| full)))
    }

    /// Calls `on_finish` with the key of every task that becomes terminal,
    /// and `on_reconnect` each time the listening connection is (re)made
    /// (notifications sent while it was down are lost: callers look again).
    /// Reconnects with backoff until `shutdown`.
    pub async fn listen_finished(
        &self,
        on_finish: impl Fn(&str),
        on_reconnect: impl Fn(),
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while !shutdown.is_cancelled() {
            let session_began = std::time::Instant::now();
            let listened = if super::requires_tls(&self.url) {
                listen(
                    &self.url,
                    crate::tls::postgres(),
                    &on_finish,
                    &on_reconnect,
                    &shutdown,
                )
                .await
            } else {
                let tls = tokio_postgres::NoTls;
                listen(&self.url, tls, &on_finish, &on_reconnect, &shutdown).await
            };
            if let Err(err) = listened {
                tracing::debug!(cause = %err, "listening for finished tasks; reconnecting");
            }
            // Never reconnect in a loop: each session's end waits, longer
            // each time in a row (a session that ran a while starts over).
            if session_began.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// One listening session, until its connection fails or `shutdown`.
async fn listen<T>(
    url: &str,
    tls: T,
    on_finish: &impl Fn(&str),
    on_reconnect: &impl Fn(),
    shutdown: &CancellationToken,
) -> Result<(), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = tokio_postgres::connect(url, tls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listening = client.batch_execute("LISTEN tareas_finished");
    tokio::pin!(listening);
    let mut listened = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            done = &mut listening, if !listened => {
                done?;
                listened = true;
                on_reconnect();
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(note))) => on_finish(note.payload()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task, Submission};
    use super::*;

    #[tokio::test]
    async fn a_task_that_becomes_terminal_is_announced() {
        let db = test_db().await;
        let task = test_task("echo");
        let key = task.task_id.as_str().to_owned();
        let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel::<()>();
        let stop = CancellationToken::new();
        let listening = {
            let (db, stop) = (db.clone(), stop.clone());
            tokio::spawn(async move {
                let on_finish = |key: &str| {
                    let _ = heard_tx.send(key.to_owned());
                };
                let on_reconnect = || {
                    let _ = ready_tx.send(());
                };
                db.listen_finished(on_finish, on_reconnect, stop).await
            })
        };
        ready.recv().await.expect("listening");
        assert!(matches!(
            db.insert_queued(&task).await,
            Ok(Submission::New(_))
        ));
        let client = db.pool.get().await.expect("connection");
        client
            .execute(
                "UPDATE tasks SET state = 'running' WHERE task_id = $1",
                &[&key],
            )
            .await
            .expect("running");
        client
            .execute(
                "UPDATE tasks SET state = 'succeeded' WHERE task_id = $1",
                &[&key],
            )
            .await
            .expect("succeeded");
        // Other tests finish tasks meanwhile: wait for this one's key.
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(heard) = heard.recv().await {
                if heard == key {
                    return true;
                }
            }
            false
        });
        assert!(
            found.await.unwrap_or(false),
            "the finish of {key} was announced"
        );
        stop.cancel();
        listening.await.expect("listener");
    }
}
