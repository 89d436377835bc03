//! How a batch is written for the script: key names, hashed ids, window codes.

use std::time::Duration;

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

/// A call that was sent (or may have been) and got no answer in time.
pub(super) fn unanswered(timeout: Duration) -> Error {
    Error::StoreOutcomeUnknown {
        message: format!("redis: no answer within {timeout:?}"),
        event: None,
    }
}

/// A failed call: [`Error::Store`] when Redis answered with an error (the
/// script did not run: Redis refuses a command whole) or the connection
/// was refused; [`Error::StoreOutcomeUnknown`] when the connection failed
/// otherwise (dropped, reset, an I/O timeout), since the request may have
/// left before it did.
pub(super) fn call_error(e: redis::RedisError) -> Error {
    if matches!(e.kind(), redis::ErrorKind::Server(_)) || e.is_connection_refusal() {
        return store_error(e);
    }
    Error::StoreOutcomeUnknown {
        message: format!("redis: {e}"),
        event: None,
    }
}

/// A read's failure: nothing it could have done changes anything.
pub(super) fn known(e: Error) -> Error {
    match e {
        Error::StoreOutcomeUnknown { message, .. } => Error::Store { message },
        e => e,
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// The text `hex` encoded, if `s` is hex of UTF-8.
pub(super) fn unhex(s: &str) -> Option<String> {
    String::from_utf8(::hex::decode(s).ok()?).ok()
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
pub(super) fn window_args(inv: &mut redis::Cmd, w: Window) {
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

impl RedisStore {
    /// A held counter as a lease record keeps it: whose (`o` for the
    /// lease's owner, else `s` or `P` and the scope's keyed digest), which
    /// meter, which window; hex, so it is one token. No scope id is in it.
    pub(super) fn hold_desc(
        &self,
        scope: &ScopeKey,
        owner: Option<&ScopeKey>,
        meter: &str,
        w: Window,
    ) -> String {
        let who = if Some(scope) == owner {
            "o".to_owned()
        } else {
            let k = match scope.kind() {
                ScopeKind::Subject => 's',
                ScopeKind::Pool => 'P',
            };
            format!("{k}{}", self.scope_hash(scope))
        };
        hex(format!("{who}\n{meter}\n{}", window_key(w)).as_bytes())
    }
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
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(b"a\nb{c}")).as_deref(), Some("a\nb{c}"));
    }
}
