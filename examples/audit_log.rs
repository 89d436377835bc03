//! Allocations shared by two replicas through one source, and every change
//! written to an audit log as JSON lines (seed 001: who changed which cap,
//! when, from what to what).
//!
//! ```text
//! cargo run --example audit_log            # the log on stdout
//! cargo run --example audit_log -- FILE    # appended to FILE
//! ```

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;
use tollgate::{
    Allocation, AuditEvent, Catalog, DecisionEvent, Engine, LimitConfig, MemoryAllocations,
    MemoryStore, Observer, Period, Request, SystemClock, Window,
};

/// Writes each audit event as one JSON line; clones share the writer.
#[derive(Clone)]
struct AuditLog(Arc<Mutex<Box<dyn Write + Send>>>);

impl Observer for AuditLog {
    fn on_decision(&self, _: &DecisionEvent<'_>) {}

    fn on_audit(&self, event: &AuditEvent) {
        let line = serde_json::to_string(event).expect("an audit event serializes");
        let mut out = self.0.lock().expect("log lock");
        // An audit trail that cannot be written should be loud.
        writeln!(out, "{line}").expect("write the audit log");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out: Box<dyn Write + Send> = match std::env::args().nth(1) {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let log = AuditLog(Arc::new(Mutex::new(out)));
    let catalog: Catalog = serde_json::from_str(
        r#"{
      "meters": [{"id": "llm_tokens_input", "unit": "count"},
                 {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 6}}}],
      "plans": [{"id": "plan_plus", "cost_meter": "cost", "prices": {"llm_tokens_input": "0.000003"},
                 "limits": [{"meter": "cost", "window": {"calendar": {"period": "month"}}, "max": 20}]}]
    }"#,
    )?;

    // Two replicas sharing counters (one store) and allocations (one
    // source); in production: RedisStore and RedisAllocations, or the
    // host's own database behind an AllocationSource.
    let (store, source) = (Arc::new(MemoryStore::new()), MemoryAllocations::new());
    let replica = || {
        Engine::with_store_and_clock(catalog.clone(), store.clone(), SystemClock)
            .with_allocation_source(source.clone(), Duration::from_secs(5))
            .with_observer(log.clone())
    };
    let (a, b) = (replica(), replica());

    a.allocate_as(Allocation::new("acct-42", "plan_plus"), "signup")?;
    let cap =
        |usd: i64| LimitConfig::new("cost", Window::calendar(Period::Month), Decimal::from(usd));
    // An admin raises the account's monthly cap through replica b.
    b.allocate_as(
        Allocation::new("acct-42", "plan_plus").with_override(cap(50)),
        "admin:maria",
    )?;
    let d = a.admit(&Request::new("acct-42").units("llm_tokens_input", 1_000))?;
    eprintln!("replica a admitted under plan {}: {}", d.plan, d.allowed);
    b.deallocate_as("acct-42", "admin:maria")?;
    Ok(())
}
