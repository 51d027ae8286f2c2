//! The dashboard: server-rendered pages under `/` and `/ui/…`, with a
//! small script that refreshes the overview in place. Assets are compiled
//! into the binary; nothing is fetched from elsewhere. With client or
//! operator tokens configured it is for operators only (HTTP Basic with
//! the operator token as password, or Bearer).

mod pages;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use base64::prelude::{Engine as _, BASE64_STANDARD};

use super::App;

/// The dashboard's routes.
pub fn routes() -> axum::Router<App> {
    axum::Router::new()
        .route("/", get(pages::overview))
        .route("/ui/live/overview", get(pages::overview_live))
        .route("/ui/tasks", get(pages::tasks))
        .route("/ui/tasks/{*key}", get(pages::task))
        .route("/ui/dead-letters", get(pages::dead_letters))
        .route("/ui/dead-letters/replay", post(pages::replay))
        .route("/ui/assets/dashboard.css", get(css))
        .route("/ui/assets/dashboard.js", get(js))
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css")],
        include_str!("dashboard.css"),
    )
}

async fn js() -> impl IntoResponse {
    let content_type = "text/javascript";
    (
        [(header::CONTENT_TYPE, content_type)],
        include_str!("dashboard.js"),
    )
}

/// An operator: the request may see the dashboard.
pub struct Operator;

impl axum::extract::FromRequestParts<App> for Operator {
    type Rejection = Response;

    /// Open while no tokens of any kind are configured (development);
    /// otherwise an operator token, as Basic password or Bearer.
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &App,
    ) -> Result<Operator, Response> {
        let operators = &app.shared.operators;
        if !operators.required() && !app.shared.tokens.required() {
            return Ok(Operator);
        }
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string());
        let token = presented(&parts.headers);
        if operators
            .authenticate(token.as_deref(), &peer)
            .await
            .is_some()
        {
            return Ok(Operator);
        }
        let mut response = (
            StatusCode::UNAUTHORIZED,
            "the dashboard is for operators: sign in with an operator token (TAREAS_OPERATOR_TOKENS) as the password\n",
        )
            .into_response();
        let challenge = header::HeaderValue::from_static("Basic realm=\"tareas\"");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
        Err(response)
    }
}

/// The token of `Authorization: Bearer <token>` or the password of
/// `Authorization: Basic <base64 user:password>`.
fn presented(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let basic = value.strip_prefix("Basic ")?.trim();
    let decoded = String::from_utf8(BASE64_STANDARD.decode(basic).ok()?).ok()?;
    let (_, password) = decoded.split_once(':')?;
    Some(password.to_owned())
}

/// Text made safe for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page: the navigation, then `body`.
pub fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · Tareas</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/assets/dashboard.css"></head>
<body><header><strong>Tareas</strong><a href="/">Overview</a><a href="/ui/tasks">Tasks</a>
<a href="/ui/dead-letters">Dead letters</a></header>
<main>{body}</main><script src="/ui/assets/dashboard.js"></script></body></html>"#,
        title = escape(title),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_and_html_are_read_and_escaped() {
        let mut headers = HeaderMap::new();
        // "ops:s3cret"
        headers.insert(
            header::AUTHORIZATION,
            "Basic b3BzOnMzY3JldA==".parse().unwrap(),
        );
        assert_eq!(presented(&headers).as_deref(), Some("s3cret"));
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(presented(&headers).as_deref(), Some("abc"));
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
