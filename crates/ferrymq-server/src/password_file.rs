//! The password file of `[auth] password_file`: one `user:hash` per line, the hash an argon2id
//! PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), written by `ferrymq passwd`.
//! Blank lines and lines starting with `#` are ignored. A user name is any non-empty text
//! without `:` or a line break (so MQTT user names with spaces work).
//!
//! Everything here is a pure function of its input (no I/O except [`hash_password`]'s salt):
//! the parser is a fuzz target and must not panic on any text.

use std::collections::HashMap;
use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// The users of a password file, with their PHC hash strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, String>,
}

/// What is wrong with a password file, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordFileError {
    #[error("line {line}: expected `user:hash`")]
    MissingColon { line: usize },
    #[error("line {line}: empty user name")]
    EmptyUser { line: usize },
    #[error("line {line}: user {user:?} appears twice (first on line {first})")]
    Duplicate {
        line: usize,
        first: usize,
        user: String,
    },
    #[error("line {line}: the hash of {user:?} is not an argon2id PHC string ({reason})")]
    BadHash {
        line: usize,
        user: String,
        reason: String,
    },
}

/// Parses a password file's text. Every hash is checked to be an argon2id PHC string, so a
/// bad file is refused at start rather than failing each login.
pub fn parse_password_file(text: &str) -> Result<PasswordFile, PasswordFileError> {
    let mut users = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim_end_matches('\r');
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let Some((user, hash)) = l.split_once(':') else {
            return Err(PasswordFileError::MissingColon { line });
        };
        if user.is_empty() {
            return Err(PasswordFileError::EmptyUser { line });
        }
        let hash = hash.trim();
        check_hash(hash).map_err(|reason| PasswordFileError::BadHash {
            line,
            user: user.to_string(),
            reason,
        })?;
        if let Some(&first) = first_line.get(user) {
            return Err(PasswordFileError::Duplicate {
                line,
                first,
                user: user.to_string(),
            });
        }
        first_line.insert(user.to_string(), line);
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(PasswordFile { users })
}

fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| e.to_string())?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!("algorithm {}", parsed.algorithm));
    }
    if parsed.hash.is_none() {
        return Err("no hash".into());
    }
    Ok(())
}

impl PasswordFile {
    /// The stored hash of `user`.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Why hashing a password failed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("no randomness for the salt: {0}")]
    Random(String),
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// An argon2id hash of `password` with a fresh random salt, as a PHC string. The parameters
/// are the argon2 crate's defaults (OWASP's: 19 MiB, 2 passes, 1 lane): ~20-40 ms here.
pub fn hash_password(password: &[u8]) -> Result<String, HashError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| HashError::Random(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

/// Whether `password` matches a PHC hash string (false for an unparsable hash). Slow on
/// purpose: call it off the async threads.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

/// What [`set_user`] and [`remove_user`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Added,
    Replaced,
    Removed,
    NotFound,
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Edit::Added => "added",
            Edit::Replaced => "updated",
            Edit::Removed => "deleted",
            Edit::NotFound => "not found",
        })
    }
}

/// Whether `user` can be stored in a password file.
pub fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && !user.contains([':', '\n', '\r'])
        && !user.starts_with('#')
        && user.trim() == user
}

/// The file's text with `user`'s line set to `hash` (replaced in place, or appended); every
/// other line is kept as it was.
pub fn set_user(text: &str, user: &str, hash: &str) -> (String, Edit) {
    let mut out = String::with_capacity(text.len() + user.len() + hash.len() + 2);
    let mut edit = Edit::Added;
    for line in text.lines() {
        if line_user(line) == Some(user) {
            if edit == Edit::Added {
                out.push_str(&format!("{user}:{hash}\n"));
                edit = Edit::Replaced;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if edit == Edit::Added {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    (out, edit)
}

/// The file's text without `user`'s line.
pub fn remove_user(text: &str, user: &str) -> (String, Edit) {
    let mut out = String::with_capacity(text.len());
    let mut edit = Edit::NotFound;
    for line in text.lines() {
        if line_user(line) == Some(user) {
            edit = Edit::Removed;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, edit)
}

fn line_user(line: &str) -> Option<&str> {
    if line.trim_start().starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(u, _)| u)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // A well-formed argon2id PHC string (not the hash of any password we use).
    const SECRET: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZDnDYI7h8NVNJVBgrpBQvUQyNSiNDNG2MMSjdQ0yYDQ";

    #[test]
    fn parses_users_comments_and_blank_lines() {
        let text = format!("# users\n\nalice:{SECRET}\r\nbob smith:{SECRET}\n");
        let f = parse_password_file(&text).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.hash_of("alice"), Some(SECRET));
        assert!(f.hash_of("bob smith").is_some());
        assert!(f.hash_of("carol").is_none());
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("alice\n", "line 1: expected `user:hash`"),
            (":x\n", "line 1: empty user name"),
            ("\n\nalice:plain\n", "line 3: the hash of \"alice\""),
            (
                "alice:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g\n",
                "argon2i",
            ),
        ];
        for (text, want) in cases {
            let err = parse_password_file(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let dup = format!("a:{SECRET}\n#\na:{SECRET}\n");
        let err = parse_password_file(&dup).unwrap_err().to_string();
        assert_eq!(err, "line 3: user \"a\" appears twice (first on line 1)");
    }

    #[test]
    fn never_panics_on_odd_text() {
        for text in [
            "",
            ":",
            "::::",
            "a:$",
            "a:$argon2id",
            "a:$argon2id$$$$$",
            "\u{0}:\u{0}",
            "é:ü\n\r\n",
            "a:$argon2id$v=19$m=1,t=1,p=1$$",
        ] {
            let _ = parse_password_file(text);
        }
    }

    #[test]
    fn edits_keep_other_lines() {
        let (t, e) = set_user("# c\nalice:old\n", "bob", "h1");
        assert_eq!((t.as_str(), e), ("# c\nalice:old\nbob:h1\n", Edit::Added));
        let (t, e) = set_user(&t, "alice", "new");
        assert_eq!(
            (t.as_str(), e),
            ("# c\nalice:new\nbob:h1\n", Edit::Replaced)
        );
        let (t, e) = remove_user(&t, "alice");
        assert_eq!((t.as_str(), e), ("# c\nbob:h1\n", Edit::Removed));
        assert_eq!(remove_user(&t, "zed").1, Edit::NotFound);
        assert!(valid_user_name("bob smith"));
        assert!(!valid_user_name("a:b"));
        assert!(!valid_user_name(""));
    }

    #[test]
    fn hash_then_verify() {
        let h = hash_password(b"pw").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&h, b"pw"));
        assert!(!verify_password(&h, b"other"));
        assert!(!verify_password("garbage", b"pw"));
    }
}
