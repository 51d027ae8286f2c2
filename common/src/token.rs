//! Client tokens as the distribuidor keeps them: the SHA-256 digest of a
//! token (tokens are long and random, so a plain digest is enough), and the
//! `TAREAS_TOKENS_FILE` line that names its client.

use sha2::{Digest, Sha256};

/// SHA-256 of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The `TAREAS_TOKENS_FILE` line for client `name` holding `token`.
pub fn file_line(name: &str, token: &str) -> String {
    format!("{name} {}", hex::encode(digest(token)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_line_is_the_name_and_the_hex_digest() {
        assert_eq!(
            super::file_line("web", "abc"),
            "web ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
