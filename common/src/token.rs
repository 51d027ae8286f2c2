//! Client tokens as the distribuidor keeps them: the SHA-256 digest of a
//! token (tokens are long and random, so a plain digest is enough), and the
//! `TAREAS_TOKENS_FILE` line that names its client, and the rules for a
//! client's name.

use sha2::{Digest, Sha256};

/// The name anonymous clients share when no tokens are configured: one
/// scope of task ids, as before tokens existed.
pub const ANONYMOUS: &str = "anonymous";

/// Client names are 1–64 of `[A-Za-z0-9._-]` (they name S3 keys), and
/// `anonymous` is the shared name of clients without a token.
pub fn check_client_name(name: &str) -> Result<(), &'static str> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err("a client name is 1 to 64 of A-Z a-z 0-9 . _ -");
    }
    if name.starts_with('.') {
        return Err("a client name cannot begin with `.` (it names a folder of S3 keys)");
    }
    if name == ANONYMOUS {
        return Err("`anonymous` is reserved for clients without a token");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("a client name cannot be an address (addresses name clients without a token)");
    }
    Ok(())
}

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
