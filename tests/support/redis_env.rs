//! The Redis test files' shared setup: the server from `TOLLGATE_REDIS_URL`
//! and key prefixes no other test run uses.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// `TOLLGATE_REDIS_URL`, or `None` after printing that the test is skipped.
pub fn url() -> Option<String> {
    match std::env::var("TOLLGATE_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipped: TOLLGATE_REDIS_URL not set");
            None
        }
    }
}

/// A key prefix no other test run uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "tollgate-test:{name}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
