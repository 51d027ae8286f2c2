//! The built-in task types: their names, their payloads and the limits on
//! them. The distribuidor validates payloads with these types before it
//! acks; the worker's built-in handlers read the same types.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const HASH: &str = "hash";
pub const FIBONACCI: &str = "fibonacci";
pub const REVERSE: &str = "reverse";
pub const SUM: &str = "sum";
pub const COMPUTE: &str = "compute";
pub const SLEEP: &str = "sleep";
pub const ECHO: &str = "echo";

/// Every built-in task type, in the order the demo client sends them.
pub const ALL: [&str; 7] = [HASH, FIBONACCI, REVERSE, SUM, COMPUTE, SLEEP, ECHO];

/// Largest `n` for `fibonacci`: F(1000) has 209 digits, the whole list ~100 KiB.
pub const FIBONACCI_MAX_N: u32 = 1_000;
/// Largest `iterations` for `compute`: about one second of one core.
pub const COMPUTE_MAX_ITERATIONS: u64 = 1_000_000_000;
/// Longest `sleep`, in milliseconds.
pub const SLEEP_MAX_MS: u64 = 60_000;

/// `hash`, `reverse` and `echo`: `{"text": s}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextPayload {
    pub text: String,
}

/// `fibonacci`: `{"n": k}`, the first k Fibonacci numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FibonacciPayload {
    pub n: u32,
}

/// `sum`: `{"numbers": [..]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumPayload {
    pub numbers: Vec<serde_json::Number>,
}

/// `compute`: `{"iterations": k}`, a CPU-bound computation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputePayload {
    pub iterations: u64,
}

/// `sleep`: `{"ms": k}`, simulated I/O-bound work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepPayload {
    pub ms: u64,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown task_type {0:?}; built-in types are: hash, fibonacci, reverse, sum, compute, sleep, echo")]
    UnknownTaskType(String),
    #[error("invalid payload for {task_type}: {reason}")]
    Invalid { task_type: String, reason: String },
}

/// Is `task_type` one of the built-ins?
pub fn is_builtin(task_type: &str) -> bool {
    ALL.contains(&task_type)
}

/// Turns the optional `task_type` and `payload` of a request into the
/// canonical pair. The course clients' shorthand, a string payload with no
/// task type, is an `echo` of that string.
pub fn normalize(
    task_type: Option<String>,
    payload: Option<Value>,
) -> Result<(String, Value), PayloadError> {
    match (task_type, payload) {
        (None, Some(Value::String(text))) => Ok((ECHO.to_owned(), json!({ "text": text }))),
        (Some(task_type), Some(Value::String(text))) if task_type == ECHO => {
            Ok((task_type, json!({ "text": text })))
        }
        (None, _) => Err(PayloadError::Invalid {
            task_type: "task".into(),
            reason: "missing \"task_type\" (only a plain string payload may omit it, as an echo)"
                .into(),
        }),
        (Some(task_type), payload) => Ok((task_type, payload.unwrap_or(Value::Null))),
    }
}

/// Checks a built-in payload against its type and limits.
pub fn validate(task_type: &str, payload: &Value) -> Result<(), PayloadError> {
    let invalid = |reason: String| PayloadError::Invalid {
        task_type: task_type.to_owned(),
        reason,
    };
    match task_type {
        HASH | REVERSE | ECHO => parse::<TextPayload>(task_type, payload).map(drop),
        FIBONACCI => {
            let p: FibonacciPayload = parse(task_type, payload)?;
            if p.n > FIBONACCI_MAX_N {
                return Err(invalid(format!(
                    "n must be at most {FIBONACCI_MAX_N}, got {}",
                    p.n
                )));
            }
            Ok(())
        }
        SUM => parse::<SumPayload>(task_type, payload).map(drop),
        COMPUTE => {
            let p: ComputePayload = parse(task_type, payload)?;
            if p.iterations > COMPUTE_MAX_ITERATIONS {
                return Err(invalid(format!(
                    "iterations must be at most {COMPUTE_MAX_ITERATIONS}, got {}",
                    p.iterations
                )));
            }
            Ok(())
        }
        SLEEP => {
            let p: SleepPayload = parse(task_type, payload)?;
            if p.ms > SLEEP_MAX_MS {
                return Err(invalid(format!(
                    "ms must be at most {SLEEP_MAX_MS}, got {}",
                    p.ms
                )));
            }
            Ok(())
        }
        other => Err(PayloadError::UnknownTaskType(other.to_owned())),
    }
}

/// Reads a payload as `T`, with an error that names the task type.
pub fn parse<T: DeserializeOwned>(task_type: &str, payload: &Value) -> Result<T, PayloadError> {
    T::deserialize(payload).map_err(|err| PayloadError::Invalid {
        task_type: task_type.to_owned(),
        reason: err.to_string(),
    })
}

/// A sample payload for each built-in type, as the demo client sends them.
pub fn sample_payload(task_type: &str) -> Value {
    match task_type {
        HASH => json!({"text": "hola"}),
        FIBONACCI => json!({"n": 100}),
        REVERSE => json!({"text": "¡Hola, mundo!"}),
        SUM => json!({"numbers": [1, 2, 3, 4.5]}),
        COMPUTE => json!({"iterations": 1_000_000}),
        SLEEP => json!({"ms": 200}),
        _ => json!({"text": "Renderizar escena"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_valid() {
        for task_type in ALL {
            validate(task_type, &sample_payload(task_type)).unwrap();
        }
    }

    #[test]
    fn refuses_bad_payloads() {
        assert!(validate(HASH, &json!({"txt": "x"})).is_err());
        assert!(validate(HASH, &json!("x")).is_err());
        assert!(validate(FIBONACCI, &json!({"n": 1001})).is_err());
        assert!(validate(FIBONACCI, &json!({"n": -1})).is_err());
        assert!(validate(SUM, &json!({"numbers": [1, "2"]})).is_err());
        assert!(validate(SLEEP, &json!({"ms": 60_001})).is_err());
        assert!(validate(COMPUTE, &json!({"iterations": 1_000_000_001u64})).is_err());
        assert_eq!(
            validate("nope", &json!({})),
            Err(PayloadError::UnknownTaskType("nope".into()))
        );
    }

    #[test]
    fn string_payload_is_an_echo() {
        let (task_type, payload) = normalize(None, Some(json!("Renderizar escena"))).unwrap();
        assert_eq!(task_type, ECHO);
        assert_eq!(payload, json!({"text": "Renderizar escena"}));
        assert!(normalize(None, Some(json!({"text": "x"}))).is_err());
    }
}
