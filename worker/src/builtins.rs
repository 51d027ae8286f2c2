//! The built-in task types. Payload types and limits come from
//! [`tareas_common::builtin`], which the distribuidor validates with too.

use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use num_bigint::BigUint;
use serde_json::{json, Number, Value};
use sha2::{Digest, Sha256};
use tareas_common::builtin::{
    self, ComputePayload, FibonacciPayload, SleepPayload, SumPayload, TextPayload, COMPUTE, ECHO,
    FIBONACCI, HASH, REVERSE, SLEEP, SUM,
};

use crate::registry::{Registry, TaskError, TaskResult};

/// Largest integer a JSON number carries exactly in every client (2^53 - 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Registers every built-in task type.
pub fn register(registry: &mut Registry) -> &mut Registry {
    registry
        .register_async(HASH, inline_when_small(hash))
        .register_async(FIBONACCI, inline_when_small(fibonacci))
        .register_async(REVERSE, inline_when_small(reverse))
        .register_async(SUM, inline_when_small(sum))
        .register_blocking(COMPUTE, compute)
        .register_async(ECHO, inline_when_small(echo))
        .register_async(SLEEP, sleep)
}

/// Payloads up to this size (bytes of text, elements of arrays) take a few
/// microseconds to a built-in: handing them to another thread costs more
/// than the work.
const INLINE_PAYLOAD_LIMIT: usize = 16 * 1024;

/// Runs `handler` right in the delivery's task when the payload is small,
/// on the blocking pool when it is not.
fn inline_when_small(
    handler: fn(Value) -> TaskResult,
) -> impl Fn(Value) -> BoxFuture<'static, TaskResult> + Send + Sync + 'static {
    move |payload| {
        if payload_size(&payload, INLINE_PAYLOAD_LIMIT) <= INLINE_PAYLOAD_LIMIT {
            return futures::future::ready(handler(payload)).boxed();
        }
        crate::executor::on_blocking_pool(move || handler(payload)).boxed()
    }
}

/// The size of a payload (bytes of strings, elements of arrays and objects),
/// counted up to a little past `limit`.
fn payload_size(value: &Value, limit: usize) -> usize {
    let mut size = 0;
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        size += match value {
            Value::String(text) => text.len(),
            Value::Array(items) => {
                stack.extend(items);
                items.len()
            }
            Value::Object(map) => {
                stack.extend(map.values());
                map.len() + map.keys().map(String::len).sum::<usize>()
            }
            _ => 1,
        };
        if size > limit {
            break;
        }
    }
    size
}

fn payload<T: serde::de::DeserializeOwned>(
    task_type: &str,
    payload: &Value,
) -> Result<T, TaskError> {
    builtin::validate(task_type, payload, &builtin::PayloadLimits::NONE)
        .map_err(|err| TaskError::permanent(err.to_string()))?;
    builtin::parse(task_type, payload).map_err(|err| TaskError::permanent(err.to_string()))
}

/// `{"text": s}` → `{"sha256": hex}`.
pub fn hash(input: Value) -> TaskResult {
    let p: TextPayload = payload(HASH, &input)?;
    Ok(json!({ "sha256": hex::encode(Sha256::digest(p.text.as_bytes())) }))
}

/// `{"n": k}` → `{"numbers": [...]}`, the first k Fibonacci numbers from 0;
/// numbers above 2^53 - 1 as decimal strings.
pub fn fibonacci(input: Value) -> TaskResult {
    let p: FibonacciPayload = payload(FIBONACCI, &input)?;
    let mut numbers = Vec::with_capacity(p.n as usize);
    let (mut a, mut b) = (BigUint::from(0u8), BigUint::from(1u8));
    for _ in 0..p.n {
        numbers.push(match u64::try_from(&a) {
            Ok(small) if small <= MAX_SAFE_INTEGER => Value::from(small),
            _ => Value::String(a.to_string()),
        });
        let next = &a + &b;
        a = std::mem::replace(&mut b, next);
    }
    Ok(json!({ "n": p.n, "numbers": numbers }))
}

/// `{"text": s}` → `{"text": reversed}`, by Unicode scalar values.
pub fn reverse(input: Value) -> TaskResult {
    let p: TextPayload = payload(REVERSE, &input)?;
    Ok(json!({ "text": p.text.chars().rev().collect::<String>() }))
}

/// `{"numbers": [..]}` → `{"sum": …}`: exact when every number is an
/// integer (as a string beyond 2^53 - 1), a float otherwise.
pub fn sum(input: Value) -> TaskResult {
    let p: SumPayload = payload(SUM, &input)?;
    let integers: Option<Vec<i128>> = p
        .numbers
        .iter()
        .map(|n| {
            n.as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
        })
        .collect();
    let total = match integers {
        Some(integers) => {
            let total: i128 = integers.iter().sum();
            if total.unsigned_abs() <= u128::from(MAX_SAFE_INTEGER) {
                Value::from(total as i64)
            } else {
                Value::String(total.to_string())
            }
        }
        None => {
            let total: f64 = p.numbers.iter().filter_map(Number::as_f64).sum();
            Number::from_f64(total)
                .map(Value::Number)
                .ok_or_else(|| TaskError::permanent("the sum is not a finite number"))?
        }
    };
    Ok(json!({ "sum": total, "count": p.numbers.len() }))
}

/// `{"iterations": k}` → `{"value": "<u64>"}`: k rounds of xorshift64*,
/// deterministic and CPU-bound.
pub fn compute(input: Value) -> TaskResult {
    let p: ComputePayload = payload(COMPUTE, &input)?;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    for _ in 0..p.iterations {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        acc = acc.wrapping_add(state.wrapping_mul(0x2545_F491_4F6C_DD1D));
    }
    Ok(json!({ "iterations": p.iterations, "value": acc.to_string() }))
}

/// `{"text": s}` → `{"text": s}`.
pub fn echo(input: Value) -> TaskResult {
    let p: TextPayload = payload(ECHO, &input)?;
    Ok(json!({ "text": p.text }))
}

/// `{"ms": k}` → `{"slept_ms": k}` after k milliseconds, without holding a thread.
pub async fn sleep(input: Value) -> TaskResult {
    let p: SleepPayload = payload(SLEEP, &input)?;
    tokio::time::sleep(Duration::from_millis(p.ms)).await;
    Ok(json!({ "slept_ms": p.ms }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hash(json!({"text": "hola"})).unwrap()["sha256"],
            "b221d9dbb083a7f33428d7c2a3c3198ae925614d70210e28716ccaa7cd4ddb79"
        );
    }

    #[test]
    fn fibonacci_is_exact() {
        let out = fibonacci(json!({"n": 100})).unwrap();
        let numbers = out["numbers"].as_array().unwrap();
        assert_eq!(numbers.len(), 100);
        assert_eq!(
            numbers[..6],
            [json!(0), json!(1), json!(1), json!(2), json!(3), json!(5)]
        );
        assert_eq!(numbers[99], json!("218922995834555169026"));
        assert!(fibonacci(json!({"n": 1001})).is_err());
    }

    #[test]
    fn reverse_by_scalar_values() {
        assert_eq!(reverse(json!({"text": "añb€"})).unwrap()["text"], "€bña");
    }

    #[test]
    fn sum_exact_and_float() {
        assert_eq!(sum(json!({"numbers": [1, 2, 3]})).unwrap()["sum"], json!(6));
        assert_eq!(
            sum(json!({"numbers": [1, 2.5]})).unwrap()["sum"],
            json!(3.5)
        );
        assert_eq!(
            sum(json!({"numbers": [9007199254740991u64, 9007199254740991u64]})).unwrap()["sum"],
            json!("18014398509481982")
        );
    }

    #[test]
    fn compute_is_deterministic() {
        let a = compute(json!({"iterations": 1000})).unwrap();
        assert_eq!(a, compute(json!({"iterations": 1000})).unwrap());
        assert_ne!(a, compute(json!({"iterations": 1001})).unwrap());
    }

    #[test]
    fn payload_size_counts_text_and_elements_and_stops_early() {
        assert_eq!(payload_size(&json!({"text": "hola"}), 100), 1 + 4 + 4);
        assert_eq!(
            payload_size(&json!({"numbers": [1, 2, 3]}), 100),
            1 + 7 + 3 + 3
        );
        let big = json!({"numbers": vec![1; 100_000]});
        // Past the limit at the array: its elements are not walked.
        assert_eq!(payload_size(&big, 100), 1 + 7 + 100_000);
    }

    #[tokio::test]
    async fn hash_is_right_both_inline_and_on_the_blocking_pool() {
        let mut registry = Registry::new();
        register(&mut registry);
        let task = |text: String| tareas_common::task::TaskMessage {
            task_id: tareas_common::task::TaskId::generate().into(),
            task_type: HASH.into(),
            payload: json!({ "text": text }),
            notify: false,
        };
        let limit = Duration::from_secs(5);
        for text in ["hola".to_owned(), "x".repeat(INLINE_PAYLOAD_LIMIT * 4)] {
            let expected = hex::encode(Sha256::digest(text.as_bytes()));
            let outcome = crate::executor::execute(
                &registry,
                &task(text),
                limit,
                crate::executor::test_slot(),
            )
            .await;
            assert_eq!(outcome.result, Some(json!({ "sha256": expected })));
        }
    }

    #[test]
    fn bad_payload_is_permanent() {
        let err = echo(json!({"nope": 1})).unwrap_err();
        assert_eq!(err.kind, crate::registry::ErrorKind::Permanent);
    }
}
