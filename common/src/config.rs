//! Configuration pieces shared by the binaries. Each is a clap `Args` group;
//! every flag has an environment twin and a default that matches the local
//! services started by `scripts/services`.

use clap::{Args, Command, Parser, ValueEnum};

/// Parses the command line and the environment into `C`, reading an
/// environment variable that is set but empty as unset (its default
/// applies). docker-compose passes `${TAREAS_X:-}` as an empty value when
/// `.env` leaves a setting out, and an empty number cannot be parsed.
/// Exits with clap's message on a bad flag, like `C::parse()`.
pub fn parse<C: Parser>() -> C {
    parse_from::<C, _, _>(std::env::args_os())
}

/// [`parse_from`] with the arguments given (the environment is still read).
pub fn parse_from<C, I, T>(args: I) -> C
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = without_empty_env(C::command()).get_matches_from(args);
    C::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

/// [`parse`], with the `KEY=value` lines of `env_file` (a compose `.env`,
/// if there is one) as defaults below the flags and the real environment.
/// The process environment is not touched.
pub fn parse_with_env_file<C: Parser>(env_file: &std::path::Path) -> C {
    let defaults = std::fs::read_to_string(env_file)
        .map(|text| env_file_values(&text))
        .unwrap_or_default();
    let command = without_empty_env(C::command());
    let command = with_defaults(command, &defaults);
    let matches = command.get_matches();
    C::from_arg_matches(&matches).unwrap_or_else(|err| err.exit())
}

/// The `KEY=value` lines of an env file (`#` comments, optional quotes;
/// empty values are left out, as compose reads them as unset).
pub fn env_file_values(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            (key.trim().to_owned(), unquoted.to_owned())
        })
        .filter(|(_, value)| !value.is_empty())
        .collect()
}

fn with_defaults(
    command: Command,
    defaults: &std::collections::HashMap<String, String>,
) -> Command {
    command
        .mut_args(|arg| {
            let from_file = arg
                .get_env()
                .filter(|name| std::env::var_os(name).is_none_or(|value| value.is_empty()))
                .and_then(|name| defaults.get(name.to_str()?));
            match from_file {
                // Once per process, at start-up: clap keeps defaults as 'static.
                // Hidden from --help: an .env holds tokens and passwords.
                Some(value) => arg
                    .default_value(&*Box::leak(value.clone().into_boxed_str()))
                    .hide_default_value(true),
                None => arg,
            }
        })
        .mut_subcommands(|sub| with_defaults(sub, defaults))
}

/// A duration as settings write it: `0`, or a whole number with a unit,
/// `ms`, `s`, `m`, `h` or `d` (`500ms`, `30s`, `1m`, `12h`, `7d`).
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: write 30s, 1m, 12h or 7d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: write a whole number and a unit, like 30s or 7d"))?;
    let seconds = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is one of ms, s, m, h, d")),
    };
    Ok(std::time::Duration::from_secs(
        number.saturating_mul(seconds),
    ))
}

/// An address setting whose empty value means "off" (see
/// `EMPTY_MEANS_OFF`): `None` when empty, else the parsed address.
pub fn optional_addr(setting: &str, value: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    let addr = value
        .parse()
        .map_err(|err| anyhow::anyhow!("{setting} {value:?}: {err} (empty turns it off)"))?;
    Ok(Some(addr))
}

/// Settings whose empty value means "off", not "the default".
const EMPTY_MEANS_OFF: &[&str] = &["DISTRIBUIDOR_HTTP_ADDR", "WORKER_METRICS_ADDR"];

fn without_empty_env(command: Command) -> Command {
    command
        .mut_args(|arg| {
            let empty = arg
                .get_env()
                .filter(|name| !EMPTY_MEANS_OFF.iter().any(|off| name == off))
                .and_then(std::env::var_os)
                .is_some_and(|value| value.is_empty());
            if empty {
                arg.env(None)
            } else {
                arg
            }
        })
        .mut_subcommands(without_empty_env)
}

/// Replicas of a quorum queue unless `TAREAS_QUORUM_SIZE` says otherwise.
pub const DEFAULT_QUORUM_SIZE: u16 = 3;

/// Where RabbitMQ is and which queue carries the tasks.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, or the URLs of a cluster's nodes separated by commas:
    /// they are tried in order, and a lost connection is made again to the
    /// first that answers.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// The work queue; its dead-letter queue is `<queue>.dlq`.
    #[arg(long, env = "TAREAS_QUEUE", default_value = "tareas")]
    pub queue: String,
    /// Most messages the work queue holds, set when it is created; past it
    /// a task gets `queue_full`. 0: unbounded. Every process of a
    /// deployment must use the same value.
    #[arg(long, env = "TAREAS_QUEUE_MAX_LENGTH", default_value_t = 1_000_000)]
    pub queue_max_length: u64,
    /// Replicas of each quorum queue (the work queue, its retry queues and
    /// its dead-letter queue), set when a queue is created
    /// (`x-quorum-initial-group-size`); RabbitMQ uses all nodes when the
    /// cluster has fewer. A single node keeps one.
    #[arg(long, env = "TAREAS_QUORUM_SIZE", default_value_t = DEFAULT_QUORUM_SIZE,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub quorum_size: u16,
}

/// Where PostgreSQL is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; the `tasks` table is created there at start-up.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tareas",
        hide_env_values = true
    )]
    pub database_url: String,
}

/// Where the S3-compatible object store is (MinIO, s3s-fs, AWS).
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint URL; requests use path-style addressing and SigV4.
    #[arg(long, env = "S3_ENDPOINT", default_value = "http://127.0.0.1:9000")]
    pub s3_endpoint: String,
    /// Bucket for result documents; created if missing.
    #[arg(long, env = "S3_BUCKET", default_value = "tareas")]
    pub s3_bucket: String,
    /// S3 access key.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "tareas")]
    pub aws_access_key_id: String,
    /// S3 secret key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "tareas-secret",
        hide_env_values = true
    )]
    pub aws_secret_access_key: String,
    /// S3 region (MinIO and s3s-fs accept any).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
}

/// How logs are written.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text` for people, `json` for log collectors. The level comes from `RUST_LOG`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// An OpenTelemetry collector (`http://host:4318`, OTLP over HTTP):
    /// spans are exported to it, a task one trace from the distribuidor to
    /// the worker. Unset: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `url` with its password replaced by `***`, for logs and error messages:
/// `amqp://tareas:secret@rabbitmq:5672/%2f` → `amqp://tareas:***@rabbitmq:5672/%2f`.
/// A URL without a password comes back unchanged.
/// `urls` is one URL or several separated by commas (`AMQP_URL` naming a
/// cluster's nodes); each has its password masked.
pub fn redacted(urls: &str) -> String {
    url_list(urls)
        .into_iter()
        .map(redacted_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// The URLs of a comma-separated list, in order. A comma that does not
/// start a new `scheme://` belongs to the URL before it (a password may
/// hold one), so no part of a URL is ever taken for a URL of its own.
pub fn url_list(urls: &str) -> Vec<&str> {
    let urls = urls.trim().trim_end_matches(',');
    let mut list: Vec<&str> = Vec::new();
    let mut start = 0;
    for (comma, _) in urls.match_indices(',') {
        let next = urls[comma + 1..].trim_start();
        let scheme_follows = next.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
        if scheme_follows {
            list.push(urls[start..comma].trim());
            start = comma + 1;
        }
    }
    list.push(urls[start..].trim());
    list.retain(|url| !url.is_empty());
    list
}

fn redacted_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The user info ends at the last `@` (a password may hold `/` or `@`;
    // masking too much is safe, too little is not).
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{duration, env_file_values, redacted};

    #[test]
    fn durations_are_read_with_their_unit() {
        use std::time::Duration;
        assert_eq!(duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert!(duration("7").is_err() && duration("7w").is_err() && duration("d").is_err());
    }

    #[test]
    fn an_env_file_gives_its_values_without_comments_quotes_or_empties() {
        let values = env_file_values(
            "# comment\nTAREAS_TOKEN=\"s3cret\"\n  DISTRIBUIDOR_ADDR = 127.0.0.1:8888\nEMPTY=\nQUOTED='a b'\nnonsense\n",
        );
        assert_eq!(
            values.get("TAREAS_TOKEN").map(String::as_str),
            Some("s3cret")
        );
        assert_eq!(
            values.get("DISTRIBUIDOR_ADDR").map(String::as_str),
            Some("127.0.0.1:8888")
        );
        assert_eq!(values.get("QUOTED").map(String::as_str), Some("a b"));
        assert!(
            !values.contains_key("EMPTY") && values.len() == 3,
            "{values:?}"
        );
    }

    #[test]
    fn redacted_hides_the_password_and_keeps_the_rest() {
        assert_eq!(
            redacted("amqp://tareas:s3cr@t@rabbitmq:5672/%2f"),
            "amqp://tareas:***@rabbitmq:5672/%2f"
        );
        assert_eq!(
            redacted("postgres://tareas:pw@postgres:5432/tareas"),
            "postgres://tareas:***@postgres:5432/tareas"
        );
        assert_eq!(
            redacted("postgres://postgres@127.0.0.1:5432/tareas"),
            "postgres://postgres@127.0.0.1:5432/tareas"
        );
        assert_eq!(redacted("not a url"), "not a url");
        assert_eq!(
            redacted("amqp://u:pa/ss@host:5672/%2f"),
            "amqp://u:***@host:5672/%2f"
        );
        assert_eq!(
            redacted("amqp://u:a,b@n1:5672/v, amqp://u:c@n2:5672/v"),
            "amqp://u:***@n1:5672/v,amqp://u:***@n2:5672/v"
        );
    }

    #[test]
    fn a_url_list_splits_only_where_a_new_url_starts() {
        use super::url_list;
        assert_eq!(url_list("amqp://a/%2f"), ["amqp://a/%2f"]);
        assert_eq!(
            url_list("amqp://u:p@a:5672/v,amqps://u:p@b:5671/v , amqp://c/v,"),
            ["amqp://u:p@a:5672/v", "amqps://u:p@b:5671/v", "amqp://c/v"]
        );
        assert_eq!(url_list("amqp://u:a,b@n1/v"), ["amqp://u:a,b@n1/v"]);
    }
}
