//! How every Tareas process talks to RabbitMQ: named connections, confirm
//! channels, and the one publishing rule.
//!
//! **The rule** ([`publish_persistent`]): a message that must not be lost is
//! published persistent (delivery mode 2) and mandatory, and counts as sent
//! only after RabbitMQ's positive confirm, within [`CONFIRM_TIMEOUT`]. An
//! unroutable message comes back and is an error, never a silent drop. The
//! distribuidor's task publish, the worker's retry copy and the operator's
//! dead-letter replay all go through it, so they cannot drift apart.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
pub use lapin::protocol::AMQPSoftError;
use lapin::types::AMQPValue;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// How long a publish may wait for RabbitMQ's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a message could not be handed to RabbitMQ. Whatever the case, the
/// sender must not act as if it were queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is unreachable")]
    Disconnected,
    #[error("RabbitMQ refused the message: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the message within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ nacked the message")]
    Nacked,
    #[error("RabbitMQ returned the message as unroutable: is queue {0:?} missing?")]
    Unroutable(String),
}

impl PublishError {
    /// What a client is told: which dependency and what happened, without
    /// the broker's or the library's own text.
    pub fn client_message(&self) -> &'static str {
        match self {
            PublishError::Disconnected => "RabbitMQ is unreachable",
            PublishError::Amqp(_) => "RabbitMQ refused the task",
            PublishError::Timeout(_) => "RabbitMQ did not confirm the task in time",
            PublishError::Nacked => "RabbitMQ refused the task",
            PublishError::Unroutable(_) => {
                "RabbitMQ returned the task as unroutable (the work queue is missing)"
            }
        }
    }

    /// Whether RabbitMQ certainly does not hold the message (as opposed to a
    /// timeout or a broken channel, after which it may).
    pub fn certainly_not_queued(&self) -> bool {
        matches!(
            self,
            PublishError::Disconnected | PublishError::Nacked | PublishError::Unroutable(_)
        )
    }
}

/// The properties a task message carries besides its body.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// The task id: RabbitMQ's management UI and tracing show it.
    pub message_id: Option<ShortString>,
    /// The task id again, for the reply that answers it.
    pub correlation_id: Option<ShortString>,
    /// The reply queue of the distribuidor that accepted the task.
    pub reply_to: Option<ShortString>,
    /// The task's W3C `traceparent` ([`traceparent`]), as an AMQP header.
    pub traceparent: Option<String>,
}

/// Name of the AMQP header carrying a task's W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A new W3C `traceparent` (`00-<trace id>-<parent id>-01`) for a task:
/// the distribuidor's and the worker's spans of the task carry its trace id.
pub fn traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let parent = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &parent[..16])
}

/// The trace id of a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

/// The `traceparent` header of a message, if it has one.
pub fn traceparent_of(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(TRACEPARENT)? {
        lapin::types::AMQPValue::LongString(value) => Some(value.to_string()),
        _ => None,
    }
}

impl Envelope {
    /// The envelope of task `task_id` whose result goes to `reply_to`.
    pub fn task(task_id: &str, reply_to: Option<ShortString>, traceparent: String) -> Envelope {
        Envelope {
            message_id: Some(task_id.into()),
            correlation_id: Some(task_id.into()),
            reply_to,
            traceparent: Some(traceparent),
        }
    }

    /// The envelope of a message being passed on (retry, replay): the same
    /// reply queue and correlation as `properties`, with `task_id` as message id.
    pub fn forwarded(task_id: &str, properties: &BasicProperties) -> Envelope {
        Envelope {
            message_id: Some(task_id.into()),
            correlation_id: properties
                .correlation_id()
                .clone()
                .or_else(|| Some(task_id.into())),
            reply_to: properties.reply_to().clone(),
            traceparent: traceparent_of(properties),
        }
    }

    fn properties(self) -> BasicProperties {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = self.message_id {
            properties = properties.with_message_id(id);
        }
        if let Some(id) = self.correlation_id {
            properties = properties.with_correlation_id(id);
        }
        if let Some(queue) = self.reply_to {
            properties = properties.with_reply_to(queue);
        }
        if let Some(traceparent) = self.traceparent {
            let mut headers = lapin::types::FieldTable::default();
            let value = lapin::types::AMQPValue::LongString(traceparent.into());
            headers.insert(TRACEPARENT.into(), value);
            properties = properties.with_headers(headers);
        }
        properties
    }
}

/// How long connecting to one node may take before the next is tried.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest [`connect`] to `urls` may take: every node's time limit.
pub fn connect_limit(urls: &str) -> Duration {
    let nodes = u32::try_from(crate::config::url_list(urls).len()).unwrap_or(u32::MAX);
    NODE_CONNECT_TIMEOUT.saturating_mul(nodes.max(1))
}

/// Runs `open` (connect to `urls`, then set up what lives on the
/// connection) until it succeeds, waiting between attempts by RabbitMQ's
/// backoff, which logs once when it goes and once when it is back. A
/// restart of RabbitMQ in the middle of opening can leave a reply pending
/// forever, so each attempt has a time limit: `setup` plus every node's
/// connect limit. `None` once `shutdown` is cancelled.
pub async fn open_with_backoff<T, F, Fut>(
    urls: &str,
    setup: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
    mut open: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, lapin::Error>>,
{
    let limit = setup + connect_limit(urls);
    crate::backoff::retry_until_ok(&crate::backoff::RABBITMQ, shutdown, || {
        let attempt = open();
        async move {
            match tokio::time::timeout(limit, attempt).await {
                Ok(opened) => opened.map_err(|err| err.to_string()),
                Err(_) => Err(format!("opening the connection took over {limit:?}")),
            }
        }
    })
    .await
}

/// Connects to RabbitMQ as `name`, the connection name its management UI
/// shows (`distribuidor-<instance>`, the worker id, `cliente-dlq`).
///
/// `urls` is `AMQP_URL`: one URL, or a cluster's nodes separated by commas
/// ([`crate::config::url_list`]). The nodes are tried in order and the first
/// that answers within [`NODE_CONNECT_TIMEOUT`] is used, so a caller that
/// lost its node reconnects to another by calling this again. When none
/// answers, the last node's error is returned.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, lapin::Error> {
    let mut failed = None;
    for url in crate::config::url_list(urls) {
        let node = crate::config::redacted(url);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connected =
            tokio::time::timeout(NODE_CONNECT_TIMEOUT, Connection::connect(url, properties)).await;
        let err = match connected {
            Ok(Ok(connection)) => {
                tracing::info!(%node, connection = name, "connected to a RabbitMQ node");
                return Ok(connection);
            }
            Ok(Err(err)) => err,
            Err(_) => lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
            )),
        };
        tracing::debug!(%node, cause = %err, "a RabbitMQ node did not answer; trying the next");
        failed = Some(err);
    }
    Err(failed.unwrap_or_else(|| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "AMQP_URL names no RabbitMQ node",
        ))
    }))
}

/// Whether RabbitMQ refused an operation with the channel error `code`
/// (say, [`AMQPSoftError::RESOURCELOCKED`]); the error closed the channel.
pub fn refused_with(err: &lapin::Error, code: AMQPSoftError) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(code))
}

/// RabbitMQ's refusal of a declare whose argument `arg` differs from the
/// existing queue's: `PRECONDITION_FAILED - inequivalent arg 'x-…' for
/// queue '…' in vhost '…': received … but current is …`. RabbitMQ names
/// only the first argument it finds different.
#[derive(Debug, Clone, PartialEq)]
pub struct Inequivalent {
    /// The argument found different.
    pub arg: String,
    /// The queue's own value of it; `None` when it has none.
    pub current: Option<AMQPValue>,
}

/// The [`Inequivalent`] refusal `err` is, if it is one.
pub fn inequivalent(err: &lapin::Error) -> Option<Inequivalent> {
    let lapin::ErrorKind::ProtocolError(e) = err.kind() else {
        return None;
    };
    if *e.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
        return None;
    }
    parse_inequivalent(e.get_message().as_str())
}

fn parse_inequivalent(text: &str) -> Option<Inequivalent> {
    let (arg, rest) = text.split_once("inequivalent arg '")?.1.split_once('\'')?;
    let current = rest.rsplit_once("but current is ")?.1;
    let current = if current.starts_with("none") {
        None
    } else {
        let (value, kind) = current
            .strip_prefix("the value '")?
            .rsplit_once("' of type '")?;
        Some(match kind.trim_end_matches('\'') {
            "longstr" => AMQPValue::LongString(value.into()),
            // RabbitMQ compares integers of any width as equal.
            _ => AMQPValue::LongLongInt(value.parse().ok()?),
        })
    };
    Some(Inequivalent {
        arg: arg.to_owned(),
        current,
    })
}

/// A new channel on `connection` in confirm mode, for [`publish_persistent`].
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes `body` to `queue` (through the default exchange) persistent and
/// mandatory on a confirm `channel`, and waits for RabbitMQ's confirm: `Ok`
/// means the message is durably queued.
pub async fn publish_persistent(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    envelope: Envelope,
) -> Result<(), PublishError> {
    let confirmed = async {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                envelope.properties(),
            )
            .await?;
        let confirmation = confirm.await?;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        if confirmation.take_message().is_some() {
            return Err(PublishError::Unroutable(queue.to_owned()));
        }
        Ok(())
    };
    tokio::time::timeout(CONFIRM_TIMEOUT, confirmed)
        .await
        .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inequivalent_arg_refusal_names_the_argument_and_the_queues_value() {
        let refusal = |tail: &str| {
            parse_inequivalent(&format!("PRECONDITION_FAILED - inequivalent arg {tail}"))
        };
        assert_eq!(
            refusal("'x-max-length' for queue 'tareas' in vhost '/': received the value '5' of type 'long' but current is the value '1000000' of type 'long'"),
            Some(Inequivalent { arg: "x-max-length".into(), current: Some(AMQPValue::LongLongInt(1_000_000)) })
        );
        assert_eq!(
            refusal("'x-quorum-initial-group-size' for queue 'tareas' in vhost '/': received the value '3' of type 'signedint' but current is none"),
            Some(Inequivalent { arg: "x-quorum-initial-group-size".into(), current: None })
        );
        assert_eq!(
            refusal("'x-overflow' for queue 'q' in vhost 'v': received the value 'reject-publish' of type 'longstr' but current is the value 'drop-head' of type 'longstr'"),
            Some(Inequivalent { arg: "x-overflow".into(), current: Some(AMQPValue::LongString("drop-head".into())) })
        );
        assert_eq!(parse_inequivalent("NOT_FOUND - no queue 'q'"), None);
    }

    #[test]
    fn a_task_carries_its_trace_context_and_a_forward_keeps_it() {
        let traceparent = traceparent();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2]
        );
        assert_eq!(trace_id(&traceparent), Some(parts[1]));
        let sent = Envelope::task("t1", None, traceparent.clone()).properties();
        assert_eq!(traceparent_of(&sent).as_deref(), Some(traceparent.as_str()));
        let forwarded = Envelope::forwarded("t1", &sent).properties();
        assert_eq!(traceparent_of(&forwarded), Some(traceparent));
    }
}
