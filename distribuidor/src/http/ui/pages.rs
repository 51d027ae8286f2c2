//! The dashboard's pages: overview (live), tasks, one task, dead letters.

use std::fmt::Write;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use tareas_common::db::{Listing, Overview, Scope, TaskRow, WorkerRow, BUCKET_SECS};
use tareas_common::dlq::{self, Selection};
use tareas_common::task::TaskKey;

use super::{escape, page, Operator};
use crate::http::{decode_cursor, encode_cursor, App};

/// An operator-facing failure: what went wrong, never a dependency's text.
fn unavailable(what: &str, err: impl std::fmt::Display) -> Response {
    tracing::warn!(cause = %err, "dashboard: {what}");
    let body = format!("{what}; retry in a moment (the distribuidor's log says why)");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        page("Unavailable", &escape(&body)),
    )
        .into_response()
}

/// `/`: the overview, refreshed in place every two seconds.
pub async fn overview(_: Operator, State(app): State<App>) -> Response {
    match live_fragment(&app).await {
        Ok(fragment) => page(
            "Overview",
            &format!(r#"<div data-live="/ui/live/overview" id="overview">{fragment}</div>"#),
        )
        .into_response(),
        Err(response) => response,
    }
}

/// The overview's content alone, for the refresh.
pub async fn overview_live(_: Operator, State(app): State<App>) -> Response {
    match live_fragment(&app).await {
        Ok(fragment) => Html(fragment).into_response(),
        Err(response) => response,
    }
}

async fn live_fragment(app: &App) -> Result<String, Response> {
    let db = &app.shared.db;
    let figures = db
        .overview(&app.broker.queue)
        .await
        .map_err(|e| unavailable("PostgreSQL is unavailable", e))?;
    let workers = db
        .workers()
        .await
        .map_err(|e| unavailable("PostgreSQL is unavailable", e))?;
    let latest = Listing {
        scope: Scope::All,
        queue: Some(app.broker.queue.clone()),
        limit: 10,
        ..Listing::default()
    };
    let (latest, _) = db
        .list(&latest)
        .await
        .map_err(|e| unavailable("PostgreSQL is unavailable", e))?;
    let depths = app.shared.broker.depths().await;
    let mut html = String::new();
    html.push_str(&figures_section(&figures, &depths));
    html.push_str(&chart(&figures));
    html.push_str(&workers_section(&workers));
    html.push_str(&format!(
        "<section><h2>Latest tasks</h2>{}</section>",
        task_table(&latest)
    ));
    Ok(html)
}

fn figures_section(figures: &Overview, depths: &[(String, u32)]) -> String {
    let seconds = |value: Option<f64>| value.map_or("–".to_owned(), |s| format!("{:.3} s", s));
    let mut html = String::from(r#"<section><h2>Now</h2><div class="figures">"#);
    let mut figure = |label: &str, value: String| {
        let _ = write!(
            html,
            r#"<div class="figure">{}<b>{}</b></div>"#,
            escape(label),
            escape(&value)
        );
    };
    figure("queued", figures.queued.to_string());
    figure("running", figures.running.to_string());
    for (queue, messages) in depths {
        figure(&format!("messages in {queue}"), messages.to_string());
    }
    figure("end to end p50 (5 min)", seconds(figures.p50));
    figure("end to end p99 (5 min)", seconds(figures.p99));
    html.push_str("</div></section>");
    html
}

/// Finished tasks per second, per 30 s over 15 minutes: succeeded stacked
/// under failed.
fn chart(figures: &Overview) -> String {
    let (width, height, bar) = (600.0, 120.0, 600.0 / 30.0);
    let per_second = |count: i64| count as f64 / BUCKET_SECS as f64;
    let top = figures
        .buckets
        .iter()
        .map(|(_, ok, failed)| per_second(ok + failed))
        .fold(1.0_f64, f64::max);
    let mut svg = format!(
        r#"<section><h2>Tasks per second, last 15 minutes (<span class="state-succeeded">succeeded</span> / <span class="state-failed">failed</span>)</h2><svg viewBox="0 0 {width} {}" width="100%" role="img" aria-label="tasks per second"><text x="0" y="10">{top:.1}/s</text>"#,
        height + 14.0
    );
    for (i, (_, ok, failed)) in figures.buckets.iter().enumerate() {
        let x = i as f64 * bar;
        let ok_h = per_second(*ok) / top * height;
        let fail_h = per_second(*failed) / top * height;
        let _ = write!(
            svg,
            r#"<rect class="ok" x="{x:.1}" y="{:.1}" width="{:.1}" height="{ok_h:.1}"><title>{ok} succeeded</title></rect><rect class="fail" x="{x:.1}" y="{:.1}" width="{:.1}" height="{fail_h:.1}"><title>{failed} failed</title></rect>"#,
            height - ok_h,
            bar - 2.0,
            height - ok_h - fail_h,
            bar - 2.0,
        );
    }
    let _ = write!(
        svg,
        r#"<text x="0" y="{}">−15 min</text><text x="{}" y="{}">now</text></svg></section>"#,
        height + 12.0,
        width - 22.0,
        height + 12.0
    );
    svg
}

fn workers_section(workers: &[WorkerRow]) -> String {
    let mut html = String::from(
        "<section><h2>Workers</h2><table><tr><th>worker</th><th>host</th><th>state</th><th>busy</th><th>done</th><th>failed</th><th>seen</th></tr>",
    );
    for worker in workers {
        let (class, state) = match worker.alive() {
            true => ("", "alive"),
            false => ("gone", "gone"),
        };
        let _ = write!(
            html,
            r#"<tr class="{class}"><td>{}</td><td>{}</td><td>{state}</td><td class="num">{}/{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{:.0} s ago</td></tr>"#,
            escape(&worker.worker_id),
            escape(&worker.host),
            worker.busy,
            worker.concurrency,
            worker.done,
            worker.failed,
            worker.seen_secs_ago,
        );
    }
    html.push_str("</table></section>");
    html
}

fn task_table(rows: &[TaskRow]) -> String {
    let mut html = String::from(
        "<table><tr><th>task</th><th>type</th><th>state</th><th>attempts</th><th>worker</th><th>created</th></tr>",
    );
    for row in rows {
        let key = row.task_id.as_str();
        let _ = write!(
            html,
            r#"<tr data-task="{key}"><td><a href="/ui/tasks/{key}">{key}</a></td><td>{}</td><td class="state-{state}">{state}</td><td class="num">{}</td><td>{}</td><td>{}</td></tr>"#,
            escape(&row.task_type),
            row.attempts,
            escape(row.worker_id.as_deref().unwrap_or("")),
            escape(&row.created_at),
            key = escape(key),
            state = row.state.as_str(),
        );
    }
    html.push_str("</table>");
    html
}

/// The Tasks page's filters and position.
#[derive(Deserialize)]
pub struct TaskFilter {
    state: Option<String>,
    task_type: Option<String>,
    /// A task id (any client's) or a key `<client>/<task_id>`.
    q: Option<String>,
    after: Option<String>,
}

/// `/ui/tasks`: newest first, filtered, a page at a time.
pub async fn tasks(
    _: Operator,
    State(app): State<App>,
    Query(filter): Query<TaskFilter>,
) -> Response {
    let blank = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    let (state, task_type, q) = (
        blank(filter.state),
        blank(filter.task_type),
        blank(filter.q),
    );
    let listing = Listing {
        scope: Scope::All,
        task_id: q.clone(),
        state: state.clone(),
        task_type: task_type.clone(),
        queue: Some(app.broker.queue.clone()),
        limit: 50,
        after: filter.after.as_deref().and_then(decode_cursor),
    };
    let (rows, next) = match app.shared.db.list(&listing).await {
        Ok(page) => page,
        Err(err) => return unavailable("PostgreSQL is unavailable", err),
    };
    let selected = |value: &str| {
        if state.as_deref() == Some(value) {
            " selected"
        } else {
            ""
        }
    };
    let options: String = ["queued", "running", "succeeded", "failed"]
        .iter()
        .map(|s| format!(r#"<option value="{s}"{}>{s}</option>"#, selected(s)))
        .collect();
    let mut body = format!(
        r#"<section><form method="get" action="/ui/tasks"><select name="state"><option value="">any state</option>{options}</select>
<input name="task_type" placeholder="task type" value="{}"> <input name="q" placeholder="task id" value="{}"> <button>Filter</button></form></section><section>{}</section>"#,
        escape(task_type.as_deref().unwrap_or("")),
        escape(q.as_deref().unwrap_or("")),
        task_table(&rows),
    );
    if let Some(next) = next {
        let mut query = vec![("after", encode_cursor(&next))];
        query.extend(state.map(|s| ("state", s)));
        query.extend(task_type.map(|t| ("task_type", t)));
        query.extend(q.map(|q| ("q", q)));
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", url_escape(v)))
            .collect();
        let _ = write!(
            body,
            r#"<p><a id="next" href="/ui/tasks?{}">Next page →</a></p>"#,
            escape(&query.join("&"))
        );
    }
    page("Tasks", &body).into_response()
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/ui/tasks/<key>`: everything about one task.
pub async fn task(_: Operator, State(app): State<App>, Path(key): Path<String>) -> Response {
    let Ok(key) = TaskKey::parse(&key) else {
        return (
            StatusCode::NOT_FOUND,
            page("Unknown task", "No such task id."),
        )
            .into_response();
    };
    let row = match app.shared.db.row(key.as_str()).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            let body = format!("Task <b>{}</b> was never acked.", escape(key.as_str()));
            return (StatusCode::NOT_FOUND, page("Unknown task", &body)).into_response();
        }
        Err(err) => return unavailable("PostgreSQL is unavailable", err),
    };
    let json = |value: &Option<serde_json::Value>| {
        value.as_ref().map_or("–".to_owned(), |v| {
            serde_json::to_string_pretty(v).unwrap_or_default()
        })
    };
    let fields = [
        ("client", key.client().to_owned()),
        ("task id", key.id().to_string()),
        ("type", row.task_type.clone()),
        ("state", row.state.as_str().to_owned()),
        ("attempts", row.attempts.to_string()),
        ("worker", row.worker_id.clone().unwrap_or_default()),
        ("created", row.created_at.clone()),
        ("started", row.started_at.clone().unwrap_or_default()),
        ("finished", row.finished_at.clone().unwrap_or_default()),
        ("S3 object", format!("results/{}.json", key.as_str())),
    ];
    let mut body = String::from("<section><table>");
    for (label, value) in fields {
        let _ = write!(
            body,
            r#"<tr><th>{label}</th><td id="{}">{}</td></tr>"#,
            label.replace(' ', "-"),
            escape(&value)
        );
    }
    let _ = write!(
        body,
        r#"</table></section><section><h2>Payload</h2><pre>{}</pre></section><section><h2>Result</h2><pre id="result">{}</pre></section><section><h2>Error</h2><pre id="error">{}</pre></section>"#,
        escape(&json(&Some(row.payload.clone()))),
        escape(&json(&row.result)),
        escape(row.error.as_deref().unwrap_or("–")),
    );
    page(&format!("Task {}", key.as_str()), &body).into_response()
}

/// How many tasks the last Replay made runnable again.
#[derive(Deserialize)]
pub struct Replayed {
    replayed: Option<usize>,
}

/// Most dead letters one view reads (and holds, unacked, while it renders).
const DEAD_LETTERS_SHOWN: usize = 200;

/// `/ui/dead-letters`: the first [`DEAD_LETTERS_SHOWN`] messages of the
/// dead-letter queue, with Replay.
pub async fn dead_letters(
    _: Operator,
    State(app): State<App>,
    Query(done): Query<Replayed>,
) -> Response {
    let letters = match dlq::list(&app.broker, DEAD_LETTERS_SHOWN).await {
        Ok(letters) => letters,
        Err(err) => return unavailable("RabbitMQ is unavailable", format!("{err:#}")),
    };
    let keys: Vec<&str> = letters
        .iter()
        .filter_map(|l| l.task_id.as_deref())
        .collect();
    let errors = match app.shared.db.records(&keys).await {
        Ok(errors) => errors,
        Err(err) => return unavailable("PostgreSQL is unavailable", err),
    };
    let mut body = String::new();
    if let Some(n) = done.replayed {
        let _ = write!(
            body,
            r#"<section id="replayed">{n} task(s) replayed.</section>"#
        );
    }
    let heading = if letters.len() == DEAD_LETTERS_SHOWN {
        format!("Dead letters (the first {DEAD_LETTERS_SHOWN}; `cliente dlq list` shows all)")
    } else {
        "Dead letters".to_owned()
    };
    let _ = write!(body, "<section><h2>{}</h2>", escape(&heading));
    body.push_str(r#"<form method="post" action="/ui/dead-letters/replay" class="inline"><input type="hidden" name="all" value="1"><button id="replay-all">Replay all</button></form><table><tr><th>task</th><th>type</th><th>why</th><th>error</th><th></th></tr>"#);
    for letter in &letters {
        let key = letter.task_id.clone().unwrap_or_default();
        let error = errors
            .get(&key)
            .and_then(|r| r.error.clone())
            .unwrap_or_default();
        let _ = write!(
            body,
            r#"<tr data-task="{key}"><td><a href="/ui/tasks/{key}">{key}</a></td><td>{}</td><td>{}</td><td>{}</td><td><form method="post" action="/ui/dead-letters/replay" class="inline"><input type="hidden" name="task" value="{key}"><button class="replay">Replay</button></form></td></tr>"#,
            escape(letter.task_type.as_deref().unwrap_or("?")),
            escape(&letter.reason),
            escape(&error),
            key = escape(&key),
        );
    }
    body.push_str("</table></section>");
    page("Dead letters", &body).into_response()
}

/// A form posted from this site, not another: a browser names the page's
/// origin (`Origin`, or `Sec-Fetch-Site`) and it must be this host.
fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, rest)| rest) == Some(host),
        // Not a browser (curl, scripts): they carry the operator's token.
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// The Replay form: one task (`task`, its key) or all (`all`).
#[derive(Deserialize)]
pub struct ReplayForm {
    task: Option<String>,
    all: Option<String>,
}

/// Replays one dead letter (`task`) or all, as `cliente dlq replay` does.
pub async fn replay(
    _: Operator,
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Response {
    if !same_origin(&headers) {
        let body = "Replay only from the dashboard's own page.";
        return (StatusCode::FORBIDDEN, page("Replay", body)).into_response();
    }
    let selection = match (form.all, form.task.as_deref().map(TaskKey::parse)) {
        (Some(_), _) => Selection::All,
        (None, Some(Ok(key))) => Selection::One(key),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                page("Replay", "Name a task, or all."),
            )
                .into_response()
        }
    };
    match dlq::replay(&app.broker, &app.shared.db, &selection).await {
        Ok(replayed) => {
            tracing::info!(count = replayed.len(), "replayed from the dashboard");
            Redirect::to(&format!("/ui/dead-letters?replayed={}", replayed.len())).into_response()
        }
        Err(err) => unavailable("the replay did not go through", format!("{err:#}")),
    }
}
