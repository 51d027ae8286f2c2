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

/// The caps on built-in payloads that an operator sets, so that no single
/// task is unboundedly large (the message size limit bounds them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLimits {
    /// Longest `text` of `hash`, `reverse` and `echo`, in bytes (`TAREAS_MAX_TEXT_BYTES`).
    pub max_text_bytes: usize,
    /// Most `numbers` of a `sum` (`TAREAS_MAX_SUM_NUMBERS`).
    pub max_sum_numbers: usize,
}

impl PayloadLimits {
    /// No operator caps: what the worker checks (the caps are the
    /// distribuidor's intake policy; a task it accepted must run).
    pub const NONE: PayloadLimits = PayloadLimits {
        max_text_bytes: usize::MAX,
        max_sum_numbers: usize::MAX,
    };
}

impl Default for PayloadLimits {
    fn default() -> PayloadLimits {
        PayloadLimits {
            max_text_bytes: 65_536,
            max_sum_numbers: 100_000,
        }
    }
}

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

/// Checks that `payload` can be stored: PostgreSQL's `jsonb` refuses the
/// NUL character (`\u0000`) in strings and keys, for any task type.
pub fn check_storable(task_type: &str, payload: &Value) -> Result<(), PayloadError> {
    if holds_nul(payload) {
        return Err(PayloadError::Invalid {
            task_type: task_type.to_owned(),
            reason:
                "the payload holds a NUL character (\\u0000), which cannot be stored; remove it"
                    .into(),
        });
    }
    Ok(())
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Checks a built-in payload against its type and limits.
pub fn validate(
    task_type: &str,
    payload: &Value,
    limits: &PayloadLimits,
) -> Result<(), PayloadError> {
    let invalid = |reason: String| PayloadError::Invalid {
        task_type: task_type.to_owned(),
        reason,
    };
    match task_type {
        HASH | REVERSE | ECHO => {
            let p: TextPayload = parse(task_type, payload)?;
            if p.text.len() > limits.max_text_bytes {
                return Err(invalid(format!(
                    "text must be at most {} bytes (TAREAS_MAX_TEXT_BYTES), got {}",
                    limits.max_text_bytes,
                    p.text.len()
                )));
            }
            Ok(())
        }
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
        SUM => {
            let p: SumPayload = parse(task_type, payload)?;
            if p.numbers.len() > limits.max_sum_numbers {
                return Err(invalid(format!(
                    "numbers must hold at most {} values (TAREAS_MAX_SUM_NUMBERS), got {}",
                    limits.max_sum_numbers,
                    p.numbers.len()
                )));
            }
            Ok(())
        }
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
            validate(
                task_type,
                &sample_payload(task_type),
                &PayloadLimits::default(),
            )
            .unwrap();
        }
    }

    #[test]
    fn refuses_bad_payloads() {
        let limits = PayloadLimits::default();
        assert!(validate(HASH, &json!({"txt": "x"}), &limits).is_err());
        assert!(validate(HASH, &json!("x"), &limits).is_err());
        assert!(validate(FIBONACCI, &json!({"n": 1001}), &limits).is_err());
        assert!(validate(FIBONACCI, &json!({"n": -1}), &limits).is_err());
        assert!(validate(SUM, &json!({"numbers": [1, "2"]}), &limits).is_err());
        assert!(validate(SLEEP, &json!({"ms": 60_001}), &limits).is_err());
        assert!(validate(COMPUTE, &json!({"iterations": 1_000_000_001u64}), &limits).is_err());
        assert_eq!(
            validate("nope", &json!({}), &limits),
            Err(PayloadError::UnknownTaskType("nope".into()))
        );
    }

    #[test]
    fn caps_text_and_sums() {
        let limits = PayloadLimits {
            max_text_bytes: 4,
            max_sum_numbers: 2,
        };
        assert!(validate(ECHO, &json!({"text": "hola"}), &limits).is_ok());
        let long = validate(ECHO, &json!({"text": "hola!"}), &limits).unwrap_err();
        assert!(long.to_string().contains("TAREAS_MAX_TEXT_BYTES"), "{long}");
        assert!(validate(SUM, &json!({"numbers": [1, 2, 3]}), &limits).is_err());
    }

    #[test]
    fn refuses_nul_in_strings_and_keys() {
        assert!(check_storable("echo", &json!({"text": "a\u{0}b"})).is_err());
        assert!(check_storable("mine", &json!({"a": [{"k\u{0}": 1}]})).is_err());
        assert!(check_storable("mine", &json!({"a": ["ok", 1, null]})).is_ok());
    }

    #[test]
    fn string_payload_is_an_echo() {
        let (task_type, payload) = normalize(None, Some(json!("Renderizar escena"))).unwrap();
        assert_eq!(task_type, ECHO);
        assert_eq!(payload, json!({"text": "Renderizar escena"}));
        assert!(normalize(None, Some(json!({"text": "x"}))).is_err());
    }
}
