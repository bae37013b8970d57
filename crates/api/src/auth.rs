//! API keys: `Authorization: Bearer KEY`, compared in constant time, never logged.
//!
//! Only the SHA-256 digests of the keys are kept, and a presented key is hashed before it is
//! compared: every comparison is then of 32 bytes against 32 bytes, so its timing says nothing
//! about the length of the keys nor how much of one a guess got right.

use std::fmt;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::{AppState, Backend};

/// Routes reachable without a key: liveness probes must work for load balancers, and the
/// dashboard's page must load so that it can ask for the key its API calls then send.
const OPEN_PATHS: &[&str] = &["/health", "/"];
/// Prefix of the dashboard's assets, reachable without a key: they are the same public files
/// in every build and hold no data of the node.
const OPEN_PREFIX: &str = "/ui/";

fn is_open(path: &str) -> bool {
    OPEN_PATHS.contains(&path) || path.starts_with(OPEN_PREFIX)
}

/// The accepted keys, as their SHA-256 digests. Debug output never shows them.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<Vec<[u8; 32]>>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys from a file's text: one per line; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Self {
        Self(Arc::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(digest)
                .collect(),
        ))
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `candidate` is one of the keys. Its digest is compared in constant time with
    /// the digest of every key, so timing does not reveal which key matched, how much of one
    /// did, or how long the keys are.
    pub fn accepts(&self, candidate: &str) -> bool {
        let candidate = digest(candidate);
        let mut ok = subtle::Choice::from(0);
        for key in self.0.iter() {
            ok |= key.ct_eq(&candidate);
        }
        ok.into()
    }
}

/// The SHA-256 digest keys are kept and compared as.
fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware rejecting requests without a valid key when keys are configured.
pub async fn require_key<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    req: Request,
    next: Next,
) -> Response {
    let keys = &state.config.keys;
    if keys.is_empty() || is_open(req.uri().path()) || req.method() == "OPTIONS" {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::unauthorized("Missing API key: send it as `Authorization: Bearer KEY`")
            .into_response(),
        Some(key) if keys.accepts(key) => next.run(req).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches_keys() {
        let keys = ApiKeys::parse("# comment\nsk-one\n\n  sk-two  \n");
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts("sk-one"));
        assert!(keys.accepts("sk-two"));
        assert!(!keys.accepts("sk-on"));
        assert!(!keys.accepts(""));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn rejects_every_near_miss_of_a_key() {
        let keys = ApiKeys::parse("sk-0123456789abcdef\n");
        assert!(keys.accepts("sk-0123456789abcdef"));
        // Prefixes, extensions, one changed byte anywhere, another case.
        let key = "sk-0123456789abcdef";
        for cut in 0..key.len() {
            assert!(!keys.accepts(&key[..cut]), "prefix of {cut} bytes accepted");
        }
        assert!(!keys.accepts("sk-0123456789abcdef0"));
        assert!(!keys.accepts("sk-0123456789abcdef\0"));
        for at in 0..key.len() {
            let mut bytes = key.as_bytes().to_vec();
            bytes[at] ^= 1;
            let near = String::from_utf8(bytes).unwrap();
            assert!(!keys.accepts(&near), "{near:?} accepted");
        }
        assert!(!keys.accepts("SK-0123456789ABCDEF"));
        // No key configured: nothing is accepted, not even the empty string.
        assert!(!ApiKeys::default().accepts(""));
    }

    #[test]
    fn keeps_digests_not_keys() {
        let keys = ApiKeys::parse("sk-secret\n");
        let expected: [u8; 32] = Sha256::digest(b"sk-secret").into();
        assert_eq!(keys.0.as_slice(), &[expected]);
        assert!(!format!("{keys:?}").contains("secret"));
    }
}
