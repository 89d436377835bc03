//! How a batch is written for the script: key names, hashed ids, window codes.

use std::time::Duration;

use sha2::{Digest, Sha256};

pub(super) use crate::store::ms_to_time;
use crate::store::{ScopeKey, ScopeKind};
use crate::window::{Period, Window};
use crate::Error;

use super::RedisStore;

pub(super) fn timed_out(timeout: Duration) -> Error {
    Error::Store {
        message: format!("redis: no answer within {timeout:?}"),
    }
}

pub(super) fn store_error(e: redis::RedisError) -> Error {
    Error::Store {
        message: format!("redis: {e}"),
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// The text `hex` encoded, if `s` is hex of UTF-8.
pub(super) fn unhex(s: &str) -> Option<String> {
    String::from_utf8(::hex::decode(s).ok()?).ok()
}

/// Whether an id looks like a credential, and is kept only as a digest.
pub(crate) fn looks_secret(id: &str) -> bool {
    const PREFIXES: [&str; 16] = [
        "sk-",
        "sk_",
        "pk_",
        "rk_",
        "api_",
        "api-",
        "key_",
        "key-",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xox",
        "AKIA",
        "eyJ",
        "Bearer ",
    ];
    if PREFIXES.iter().any(|p| id.starts_with(p)) {
        return true;
    }
    id.len() >= 24
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_+/=.".contains(&b))
        && id.bytes().any(|b| b.is_ascii_digit())
        && id.bytes().any(|b| b.is_ascii_alphabetic())
}

pub(super) fn digest(id: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(id.as_bytes())[..16]))
}

/// A window as it appears in a counter key.
pub(super) fn window_key(w: Window) -> String {
    match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => format!("c{}{utc_offset_secs}", period_code(period)),
        Window::Rolling { span_secs, buckets } => format!("r{span_secs}/{buckets}"),
        Window::Lifetime => "l".into(),
        Window::Concurrent => "x".into(),
    }
}

pub(super) fn parse_window_key(s: &str) -> Option<Window> {
    let (head, rest) = s.split_at_checked(1)?;
    match head {
        "c" => {
            let (p, off) = rest.split_at_checked(1)?;
            let period = match p {
                "d" => Period::Day,
                "w" => Period::Week,
                "m" => Period::Month,
                _ => return None,
            };
            Some(Window::Calendar {
                period,
                utc_offset_secs: off.parse().ok()?,
            })
        }
        "r" => {
            let (span, buckets) = rest.split_once('/')?;
            Some(Window::Rolling {
                span_secs: span.parse().ok()?,
                buckets: buckets.parse().ok()?,
            })
        }
        "l" => Some(Window::Lifetime),
        "x" => Some(Window::Concurrent),
        _ => None,
    }
}

pub(super) fn period_code(p: Period) -> char {
    match p {
        Period::Day => 'd',
        Period::Week => 'w',
        Period::Month => 'm',
    }
}

/// A window as the script reads it: a kind and two parameters, the period
/// and UTC offset of a calendar window, the bucket width (ms) and count
/// (buckets + 1) of a rolling one (separate arguments, so the script
/// parses no spec on the hot path).
pub(super) fn window_args(inv: &mut redis::ScriptInvocation<'_>, w: Window) {
    match w {
        Window::Calendar {
            period,
            utc_offset_secs,
        } => {
            let p = match period {
                Period::Day => "d",
                Period::Week => "w",
                Period::Month => "m",
            };
            inv.arg("C").arg(p).arg(utc_offset_secs);
        }
        Window::Rolling { span_secs, buckets } => {
            inv.arg("R")
                .arg(Window::bucket_ms(span_secs, buckets))
                .arg(u64::from(buckets) + 1);
        }
        Window::Lifetime => {
            inv.arg("L").arg("-").arg("-");
        }
        Window::Concurrent => {
            inv.arg("X").arg("-").arg("-");
        }
    }
}

/// A held counter as a lease record keeps it: whose (relative to the
/// lease's owner), which meter, which window; hex, so it is one token.
pub(super) fn hold_desc(
    scope: &ScopeKey,
    owner: Option<&ScopeKey>,
    meter: &str,
    w: Window,
) -> String {
    let who = if Some(scope) == owner {
        "o".to_owned()
    } else if looks_secret(scope.id()) || scope.kind() == ScopeKind::Subject {
        let k = if scope.kind() == ScopeKind::Subject {
            's'
        } else {
            'P'
        };
        format!("{k}{}", RedisStore::scope_hash(scope))
    } else {
        format!("p{}", scope.id())
    };
    hex(format!("{who}\n{meter}\n{}", window_key(w)).as_bytes())
}

pub(super) fn bad_reply(what: &str) -> Error {
    Error::Store {
        message: format!("redis: unexpected script reply ({what})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_looking_ids_are_recognised() {
        for id in [
            "sk-live-abc",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
            "AKIAIOSFODNN7EXAMPLE",
            "a1b2c3d4e5f6a7b8c9d0e1f2a3",
        ] {
            assert!(looks_secret(id), "{id}");
        }
        for id in ["agent-7", "acme", "user@example.com", "", "repo/tollgate"] {
            assert!(!looks_secret(id), "{id}");
        }
    }

    #[test]
    fn window_keys_round_trip() {
        for w in [
            Window::calendar(Period::Month),
            Window::Calendar {
                period: Period::Week,
                utc_offset_secs: -19_800,
            },
            Window::Rolling {
                span_secs: 86_400,
                buckets: 24,
            },
            Window::Lifetime,
            Window::Concurrent,
        ] {
            assert_eq!(parse_window_key(&window_key(w)), Some(w));
        }
    }

    #[test]
    fn scope_hashes_separate_kinds_and_ids() {
        let a = RedisStore::scope_hash(&ScopeKey::subject("x"));
        let b = RedisStore::scope_hash(&ScopeKey::pool("x"));
        let c = RedisStore::scope_hash(&ScopeKey::subject(""));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 32);
        assert_eq!(unhex(&hex(b"a\nb{c}")).as_deref(), Some("a\nb{c}"));
    }
}
