//! Tracing set-up: level from `RUST_LOG` (default `info`), text or JSON;
//! text is coloured only on a terminal (a log file or a collector gets
//! plain lines). With `OTEL_EXPORTER_OTLP_ENDPOINT`, spans also go to an
//! OpenTelemetry collector (OTLP over HTTP, JSON), and a task's W3C
//! `traceparent` ([`crate::amqp::TRACEPARENT`]) makes the distribuidor's
//! and the worker's spans one trace.

use std::io::IsTerminal;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogArgs, LogFormat};

/// Keeps the span exporter running; flushes it when dropped (at exit).
pub struct Guard(Option<SdkTracerProvider>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber for process `service`. Call once, from
/// `main`, and keep the guard until the process ends.
pub fn init(log: &LogArgs, service: &'static str) -> Guard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,tokio_postgres=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match log.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = log
        .otel_endpoint
        .as_deref()
        .and_then(|endpoint| provider(endpoint, service));
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    if let Some(endpoint) = &log.otel_endpoint {
        tracing::info!(%endpoint, "spans go to the OpenTelemetry collector");
    }
    Guard(provider)
}

fn provider(endpoint: &str, service: &'static str) -> Option<SdkTracerProvider> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(url)
        .build();
    match exporter {
        Ok(exporter) => {
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            Some(provider)
        }
        Err(err) => {
            eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint}: {err}; spans are not exported");
            None
        }
    }
}

/// The W3C `traceparent` of `span` when it is exported (its own trace),
/// else a fresh one ([`crate::amqp::traceparent`]): what a task's message
/// carries.
pub fn traceparent_of(span: &tracing::Span) -> String {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() {
        return crate::amqp::traceparent();
    }
    format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    )
}

/// Makes `span` a child of the trace a message's `traceparent` names (when
/// spans are exported; otherwise its trace id is only a log field).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let mut parts = traceparent.split('-');
    let (Some("00"), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(trace), Ok(parent), Ok(flags)) = (
        opentelemetry::trace::TraceId::from_hex(trace),
        opentelemetry::trace::SpanId::from_hex(parent),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    let remote = opentelemetry::trace::SpanContext::new(
        trace,
        parent,
        opentelemetry::trace::TraceFlags::new(flags),
        true,
        Default::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
}
