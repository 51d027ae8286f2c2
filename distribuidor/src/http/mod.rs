//! The HTTP API beside the socket (`DISTRIBUIDOR_HTTP_ADDR`): the same
//! intake (validation, record, confirmed publish) behind `POST /tasks`,
//! the `tasks` table behind `GET /tasks[/<id>]`, health for balancers, and
//! its own OpenAPI document at `/openapi.json`. Errors carry the socket's
//! codes. docs/http.md is the reference.

mod tasks;
mod ui;
mod waiters;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tareas_common::protocol::{ErrorCode, ErrorReply, Reply};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::ANONYMOUS;
use crate::intake::Shared;
pub use waiters::Waiters;

/// Longest `?wait=` a request may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// What every request shares.
#[derive(Clone)]
pub struct App {
    /// The intake, the database, the tokens: the same as the socket's.
    pub shared: Arc<Shared>,
    /// Requests waiting for their task to finish.
    pub waiters: Arc<Waiters>,
    /// Long polls at once; past it a `?wait=` answers at once.
    pub polls: Arc<tokio::sync::Semaphore>,
    /// Shutdown began: long polls answer now.
    pub shutdown: CancellationToken,
    /// Where the dead-letter queue is, for the dashboard.
    pub broker: tareas_common::config::BrokerArgs,
}

impl App {
    /// The API's state, and the listener that wakes long polls when any
    /// distribuidor's task finishes (`LISTEN tareas_finished`), until `stop`.
    pub fn start(
        shared: Arc<Shared>,
        config: &crate::config::Config,
        stop: CancellationToken,
        shutdown: CancellationToken,
    ) -> App {
        let waiters = Arc::new(Waiters::default());
        let (db, finished, reconnected) = (shared.db.clone(), waiters.clone(), waiters.clone());
        tokio::spawn(async move {
            let on_finish = |key: &str| finished.finished(key);
            let on_reconnect = || reconnected.wake_all();
            db.listen_finished(on_finish, on_reconnect, stop).await;
        });
        App {
            shared,
            waiters,
            polls: Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
            shutdown,
            broker: config.broker.clone(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(info(
    title = "Tareas",
    description = "Submit tasks and read their results. The same rules as the socket protocol (docs/protocol.md)."
))]
struct ApiDoc;

/// The router and its OpenAPI document, built from the same handlers: a
/// route cannot exist without being documented.
pub fn router(app: App, max_body_bytes: usize) -> axum::Router {
    let (router, mut api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tasks::submit, tasks::list))
        .routes(routes!(tasks::get))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(prometheus))
        .with_state(app.clone())
        .split_for_parts();
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let document = Arc::new(api);
    router
        .merge(ui::routes().with_state(app))
        .route(
            "/openapi.json",
            axum::routing::get(move || async move { Json(document.as_ref().clone()) }),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(MAX_WAIT_SECS + 15),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Serves the API on `listener` until `shutdown` (requests in progress
/// finish first).
pub async fn serve(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) {
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, service)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = served {
        tracing::error!(cause = %err, "the HTTP listener failed");
    }
}

/// Who sends a request.
pub struct Who {
    /// The client whose task ids it names.
    pub scope: String,
    /// Whose quota its tasks count against: the client, else its address.
    pub quota: String,
}

impl axum::extract::FromRequestParts<App> for Who {
    type Rejection = Response;

    /// The client the request's `Authorization: Bearer` token names, or
    /// `unauthenticated` (after the growing delay of failures from its
    /// address). Without tokens configured, the anonymous scope.
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<Who, Response> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|info| info.0)
            .ok_or_else(|| error(ErrorCode::Unavailable, "no peer address", None))?;
        app.who(&parts.headers, peer).await
    }
}

impl App {
    async fn who(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Who, Response> {
        let tokens = &self.shared.tokens;
        if !tokens.required() {
            return Ok(Who {
                scope: ANONYMOUS.to_owned(),
                quota: peer.ip().to_string(),
            });
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let peer = peer.ip().to_string();
        if let Some(name) = tokens.authenticate(bearer, &peer).await {
            return Ok(Who {
                scope: name.to_owned(),
                quota: name.to_owned(),
            });
        }
        Err(error(
            ErrorCode::Unauthenticated,
            "send `Authorization: Bearer <token>` with a token this distribuidor knows",
            None,
        ))
    }
}

/// A listing's position as the `next` of a page: hex of `<created_at>|<key>`.
pub fn encode_cursor((at, key): &(String, String)) -> String {
    hex::encode(format!("{at}|{key}"))
}

/// The position a `next` names; `None` if it is not one.
pub fn decode_cursor(cursor: &str) -> Option<(String, String)> {
    let text = String::from_utf8(hex::decode(cursor).ok()?).ok()?;
    let (at, key) = text.split_once('|')?;
    Some((at.to_owned(), key.to_owned()))
}

/// `{"error":{"code":…,"message":…}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ErrorDetail {
    /// One of the socket protocol's error codes.
    code: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
}

/// The HTTP status of each error code.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidJson | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidPayload | ErrorCode::UnknownTaskType => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::QuotaExceeded | ErrorCode::TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::QueueFull => StatusCode::SERVICE_UNAVAILABLE,
        // The task may or may not run: resubmitting the same id is safe.
        ErrorCode::Uncertain => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::IdleTimeout | ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::SlowConsumer => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// An error response with the socket's code.
pub fn error(code: ErrorCode, message: impl Into<String>, task_id: Option<String>) -> Response {
    from_reply(ErrorReply {
        code,
        message: message.into(),
        task_id,
    })
}

fn from_reply(reply: ErrorReply) -> Response {
    let status = status_of(reply.code);
    let body = ErrorBody {
        error: ErrorDetail {
            code: reply.code.as_str().to_owned(),
            message: reply.message,
            task_id: reply.task_id,
        },
    };
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// An error reply of the intake as a response; any other reply is a bug.
fn from_intake(reply: Reply) -> Response {
    match reply {
        Reply::Error(error) => from_reply(error),
        other => {
            tracing::error!(
                ?other,
                "the intake refused with a reply that is not an error"
            );
            error(ErrorCode::Unavailable, "internal error; retry later", None)
        }
    }
}

/// Prometheus text format: counters, histograms and gauges of this
/// distribuidor (docs/operations.md lists them). No task data.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn prometheus() -> impl IntoResponse {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        tareas_common::metrics::render(),
    )
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `ready` when RabbitMQ is linked and PostgreSQL answers, as the socket's
/// `health`; 503 otherwise (a balancer sends this replica no clients).
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Ready: tasks are accepted"),
    (status = 503, description = "Not ready: tasks would get `unavailable`"),
))]
async fn readyz(axum::extract::State(app): axum::extract::State<App>) -> Response {
    let health = app.shared.health().await;
    let ready = matches!(health, Reply::Health { ready: true, .. });
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(health)).into_response()
}
