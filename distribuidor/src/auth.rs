//! Who a client is: the tokens the distribuidor accepts, each naming a
//! client (`TAREAS_TOKENS_FILE`, or `TAREAS_TOKENS` for development).
//!
//! Only the SHA-256 digest of each token is kept (tokens are long and
//! random, so a plain digest is enough), and a presented token is compared
//! with every digest in constant time. Repeated failures from one address
//! are answered ever more slowly (forgotten after a minute without one); a
//! right token is answered at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub use tareas_common::token::ANONYMOUS;
use tareas_common::token::{check_client_name, digest};

use crate::config::Secret;

/// The first failure's delay; each further one from the same address doubles it.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay before a failure is answered.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Addresses remembered for their failures; past it the memory starts over.
const MAX_TRACKED: usize = 10_000;
/// A minute without a failure and an address starts from the first delay again.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The tokens and what they name; empty: anonymous clients are served.
pub struct Tokens {
    digests: Vec<(String, [u8; 32])>,
    failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

/// Why the token configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading TAREAS_TOKENS_FILE {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin} line {line}: {problem}; expected `name sha256-hex` (TAREAS_TOKENS_FILE) or `name=token` (TAREAS_TOKENS)")]
    Malformed {
        origin: &'static str,
        line: usize,
        problem: &'static str,
    },
}

impl Tokens {
    /// From `TAREAS_TOKENS` (`name=token,…`) and `TAREAS_TOKENS_FILE`
    /// (`name sha256-hex` per line; `#` starts a comment).
    pub fn load(tokens: &[Secret], file: Option<&str>) -> Result<Tokens, TokensError> {
        let mut digests = Vec::new();
        for (index, entry) in tokens.iter().enumerate() {
            let malformed = |problem| TokensError::Malformed {
                origin: "TAREAS_TOKENS",
                line: index + 1,
                problem,
            };
            let (name, token) = entry.0.split_once('=').ok_or(malformed("no `=`"))?;
            check_client_name(name).map_err(malformed)?;
            if token.is_empty() {
                return Err(malformed("an empty token"));
            }
            digests.push((name.to_owned(), digest(token)));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
                path: path.to_owned(),
                source,
            })?;
            for (index, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                let malformed = |problem| TokensError::Malformed {
                    origin: "TAREAS_TOKENS_FILE",
                    line: index + 1,
                    problem,
                };
                let (name, hex_digest) = line.split_once(' ').ok_or(malformed("no space"))?;
                check_client_name(name).map_err(malformed)?;
                let bytes = hex::decode(hex_digest.trim())
                    .map_err(|_| malformed("the digest is not hexadecimal"))?;
                let digest: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| malformed("the digest is not 64 hex digits (SHA-256)"))?;
                digests.push((name.to_owned(), digest));
            }
        }
        Ok(Tokens {
            digests,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Whether clients must authenticate.
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// The client `token` names, comparing with every digest in constant time.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let presented = digest(token);
        let mut found = None;
        for (name, known) in &self.digests {
            let difference = known
                .iter()
                .zip(presented.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The name of `presented`'s token, if it is one of these. A token that
    /// is not answers after the delay [`Tokens::failed`] sets for `peer`,
    /// so that guessing is slow; no token at all answers at once.
    pub async fn authenticate(&self, presented: Option<&str>, peer: &str) -> Option<&str> {
        let presented = presented?;
        if let Some(name) = self.verify(presented) {
            return Some(name);
        }
        tokio::time::sleep(self.failed(peer)).await;
        None
    }

    /// Counts a failure from `peer`; returns how long to wait before answering it.
    pub fn failed(&self, peer: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failures.len() >= MAX_TRACKED {
            failures.clear();
        }
        let now = std::time::Instant::now();
        let (count, last) = failures.entry(peer.to_owned()).or_insert((0, now));
        if now.duration_since(*last) > FORGET_AFTER {
            *count = 0;
        }
        *count = count.saturating_add(1);
        *last = now;
        FIRST_DELAY
            .saturating_mul(2u32.saturating_pow(count.saturating_sub(1).min(16)))
            .min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: &str) -> Secret {
        Secret(value.to_owned())
    }

    #[test]
    fn tokens_from_the_environment_and_from_a_file_name_their_clients() {
        let dir = std::env::temp_dir().join(format!("tareas-tokens-{}", std::process::id()));
        std::fs::write(
            &dir,
            format!(
                "# comment\nreports {}\n\n",
                hex::encode(digest("file-secret"))
            ),
        )
        .unwrap();
        let tokens = Tokens::load(&[secret("web=env-secret")], dir.to_str()).unwrap();
        assert!(tokens.required());
        assert_eq!(tokens.verify("env-secret"), Some("web"));
        assert_eq!(tokens.verify("file-secret"), Some("reports"));
        assert_eq!(tokens.verify("env-secre"), None);
        assert_eq!(tokens.verify(""), None);
        let _ = std::fs::remove_file(dir);
        assert!(!Tokens::load(&[], None).unwrap().required());
    }

    #[test]
    fn bad_configuration_is_refused_with_where_and_why() {
        for bad in [
            "noequals",
            "=token",
            "web=",
            "anonymous=x",
            "we b=x",
            "10.0.0.1=x",
        ] {
            let err = Tokens::load(&[secret(bad)], None).err().expect(bad);
            assert!(err.to_string().contains("TAREAS_TOKENS line 1"), "{err}");
        }
    }

    #[test]
    fn failures_from_one_address_are_answered_ever_more_slowly() {
        let tokens = Tokens::load(&[secret("web=s")], None).unwrap();
        let delays: Vec<Duration> = (0..8).map(|_| tokens.failed("10.0.0.1")).collect();
        assert_eq!(delays[0], FIRST_DELAY);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[7], MAX_DELAY);
        assert_eq!(tokens.failed("10.0.0.2"), FIRST_DELAY, "per address");
    }
}
