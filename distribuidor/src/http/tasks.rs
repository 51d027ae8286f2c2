//! `POST /tasks`, `GET /tasks/<task_id>[?wait=]` and `GET /tasks`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tareas_common::db::{Listing, Scope, TaskRow};
use tareas_common::protocol::{ErrorCode, TaskRequest};
use tareas_common::task::TaskKey;

use super::waiters::FALLBACK;
use super::{decode_cursor, encode_cursor, error, from_intake, App, ErrorBody, Who, MAX_WAIT_SECS};
use crate::auth::ANONYMOUS;

/// The body of `POST /tasks`: the socket's `task` fields.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    /// A built-in task type or one of `TAREAS_EXTRA_TASK_TYPES`.
    task_type: Option<String>,
    #[schema(value_type = Object)]
    payload: Option<Value>,
    /// 1–128 of `[A-Za-z0-9._:-]`; else the `Idempotency-Key` header, else a UUID.
    task_id: Option<String>,
}

/// `202 Accepted`: recorded and confirmed by RabbitMQ.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    task_id: String,
    /// Always `queued`.
    status: &'static str,
}

/// A task as the `tasks` table holds it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskView {
    task_id: String,
    task_type: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    state: String,
    #[schema(value_type = Option<Object>)]
    result: Option<Value>,
    error: Option<String>,
    worker_id: Option<String>,
    attempts: u32,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl From<TaskRow> for TaskView {
    fn from(row: TaskRow) -> TaskView {
        TaskView {
            task_id: row.task_id.id().to_string(),
            task_type: row.task_type,
            state: row.state.as_str().to_owned(),
            result: row.result,
            error: row.error,
            worker_id: row.worker_id,
            attempts: row.attempts,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        }
    }
}

/// `404`: no such task was ever acked (for this client), `unknown`; `410`:
/// retention removed it (`TAREAS_RESULT_TTL`), `expired`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Unknown {
    task_id: String,
    /// `unknown` or `expired`.
    state: &'static str,
}

/// Submits a task; answers once it is durably queued.
#[utoipa::path(post, path = "/tasks", request_body = Submit,
    params(("Idempotency-Key" = Option<String>, Header, description = "the task_id, when the body has none")),
    responses(
        (status = 202, body = Accepted, headers(("Location" = String, description = "/tasks/<task_id>"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody), (status = 504, body = ErrorBody),
    ))]
pub async fn submit(
    State(app): State<App>,
    who: Who,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        return error(
            ErrorCode::TooLarge,
            "the body exceeds TAREAS_MAX_MESSAGE_BYTES",
            None,
        );
    };
    let submit: Submit = match serde_json::from_slice::<Value>(&body) {
        Err(err) => {
            return error(
                ErrorCode::InvalidJson,
                format!("the body is not JSON: {err}"),
                None,
            )
        }
        Ok(json) => match serde_json::from_value(json) {
            Ok(submit) => submit,
            Err(err) => {
                return error(
                    ErrorCode::InvalidRequest,
                    format!("not a task: {err}"),
                    None,
                )
            }
        },
    };
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let request = TaskRequest {
        task_id: submit.task_id.or(idempotency_key),
        task_type: submit.task_type,
        payload: submit.payload,
        // Nobody waits on a connection: results are read with GET.
        notify: Some(false),
    };
    let task = match app.shared.prepare(request, &who.scope) {
        Ok(task) => task,
        Err(err) => return from_intake(err.into_reply()),
    };
    let task_id = task.task_id.id().to_string();
    if let Err(reply) = app.shared.submit_detached(&task, &who.quota).await {
        return from_intake(reply);
    }
    let location = format!("/tasks/{task_id}");
    let body = Accepted {
        task_id,
        status: "queued",
    };
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct WaitParams {
    /// Seconds to wait for the task to finish (at most 60).
    wait: Option<u64>,
}

/// A task and its result; `?wait=` answers as soon as it is finished.
#[utoipa::path(get, path = "/tasks/{task_id}", params(("task_id" = String, Path), WaitParams),
    responses(
        (status = 200, body = TaskView), (status = 404, body = Unknown), (status = 410, body = Unknown),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub async fn get(
    State(app): State<App>,
    who: Who,
    Path(task_id): Path<String>,
    Query(params): Query<WaitParams>,
) -> Response {
    let key = match TaskKey::for_client(&who.scope, &task_id) {
        Ok(key) => key,
        Err(err) => return error(ErrorCode::InvalidRequest, err.to_string(), None),
    };
    let wait = Duration::from_secs(params.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    match wait_for(&app, &key, wait).await {
        Ok(Some(row)) => Json(TaskView::from(row)).into_response(),
        Ok(None) => match app.shared.db.is_expired(key.as_str()).await {
            Ok(true) => {
                let body = Unknown {
                    task_id,
                    state: "expired",
                };
                (StatusCode::GONE, Json(body)).into_response()
            }
            _ => {
                let body = Unknown {
                    task_id,
                    state: "unknown",
                };
                (StatusCode::NOT_FOUND, Json(body)).into_response()
            }
        },
        Err(response) => response,
    }
}

/// The task's row once it is terminal, or as it is when `wait` ends.
async fn wait_for(app: &App, key: &TaskKey, wait: Duration) -> Result<Option<TaskRow>, Response> {
    // A plain read takes no long-poll slot. At most `polls` wait at once;
    // the others answer with the row as it is.
    if wait.is_zero() {
        return read_row(app, key).await;
    }
    let Ok(_poll) = app.polls.try_acquire() else {
        return read_row(app, key).await;
    };
    let deadline = tokio::time::Instant::now() + wait;
    let waiting = app.waiters.wait(key.as_str());
    loop {
        let notified = waiting.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let row = read_row(app, key).await?;
        let now = tokio::time::Instant::now();
        let finished = row.as_ref().is_some_and(|row| row.state.is_terminal());
        if finished || now >= deadline || app.shutdown.is_cancelled() {
            return Ok(row);
        }
        let look_again = (now + FALLBACK).min(deadline);
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(look_again) => {}
            () = app.shutdown.cancelled() => {}
        }
    }
}

async fn read_row(app: &App, key: &TaskKey) -> Result<Option<TaskRow>, Response> {
    app.shared.db.row(key.as_str()).await.map_err(|err| {
        tracing::warn!(cause = %err, "reading a task for the HTTP API");
        error(
            ErrorCode::Unavailable,
            "PostgreSQL is unavailable; retry later",
            None,
        )
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// `queued`, `running`, `succeeded` or `failed`.
    state: Option<String>,
    task_type: Option<String>,
    /// At most this many tasks (default 50, at most 500).
    limit: Option<i64>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// A page of this client's tasks, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskList {
    tasks: Vec<TaskView>,
    /// Pass as `after` for the next page; `null` on the last.
    next: Option<String>,
}

/// This client's tasks, newest first, a page at a time.
#[utoipa::path(get, path = "/tasks", params(ListParams), responses(
    (status = 200, body = TaskList), (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 503, body = ErrorBody),
))]
pub async fn list(State(app): State<App>, who: Who, Query(params): Query<ListParams>) -> Response {
    let after = match params.after.as_deref().map(decode_cursor) {
        None => None,
        Some(Some(after)) => Some(after),
        Some(None) => {
            return error(
                ErrorCode::InvalidRequest,
                "`after` is not a `next` of this API",
                None,
            )
        }
    };
    let listing = Listing {
        scope: match who.scope.as_str() {
            ANONYMOUS => Scope::Anonymous,
            _ => Scope::Client(who.scope),
        },
        task_id: None,
        queue: None,
        state: params.state,
        task_type: params.task_type,
        limit: params.limit.unwrap_or(50).clamp(1, 500),
        after,
    };
    match app.shared.db.list(&listing).await {
        Ok((rows, next)) => Json(TaskList {
            tasks: rows.into_iter().map(TaskView::from).collect(),
            next: next.map(|next| encode_cursor(&next)),
        })
        .into_response(),
        Err(err) => {
            tracing::warn!(cause = %err, "listing tasks for the HTTP API");
            error(
                ErrorCode::Unavailable,
                "PostgreSQL is unavailable; retry later",
                None,
            )
        }
    }
}
