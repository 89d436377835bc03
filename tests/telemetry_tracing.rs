//! Feature `tracing`: one span per engine call, with the call, status,
//! refusal reason, binding meter and store latency, and the subject only as
//! a digest.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig, Request, Window,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Each span's name and fields, as text.
type Spans = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// A subscriber that keeps every span's fields.
struct Keep {
    spans: Spans,
    next: AtomicU64,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Keep {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        self.next.fetch_add(1, Ordering::SeqCst);
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let i = span.into_u64() as usize - 1;
        values.record(&mut Fields(&mut spans[i].1));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn engine() -> Engine {
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("jobs"))
        .plan(
            PlanConfig::new("p")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    100u64,
                ))
                .limit(LimitConfig::new(
                    "jobs",
                    Window::calendar(Period::Day),
                    10u64,
                )),
        )
        .build()
        .unwrap();
    let engine = Engine::new(catalog);
    engine
        .allocate(Allocation::new("agent-secret-7", "p"))
        .unwrap();
    engine
}

#[test]
fn each_call_has_a_span_with_its_outcome_and_a_digest_of_the_subject() {
    let engine = engine();
    let spans = Spans::default();
    let keep = Keep {
        spans: spans.clone(),
        next: AtomicU64::new(0),
    };
    tracing::subscriber::with_default(keep, || {
        let d = engine
            .admit(
                &Request::new("agent-secret-7")
                    .units("tokens", 60)
                    .units("jobs", 1),
            )
            .unwrap();
        assert!(d.allowed);
        let d = engine
            .admit(
                &Request::new("agent-secret-7")
                    .units("tokens", 60)
                    .units("jobs", 1),
            )
            .unwrap();
        assert!(!d.allowed);
        engine
            .check(&Request::new("agent-secret-7").units("jobs", 1))
            .unwrap();
        assert!(engine
            .admit(&Request::new("nobody").units("jobs", 1))
            .is_err());
    });
    let spans = spans.lock().unwrap();
    assert_eq!(spans.len(), 4, "{spans:?}");
    for (name, fields) in spans.iter() {
        assert_eq!(name, "tollgate.call");
        let subject = &fields["subject"];
        assert_eq!(subject.len(), 16, "{fields:?}");
        assert!(subject.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!fields
            .values()
            .any(|v| v.contains("agent-secret-7") || v.contains("nobody")));
    }
    let (ok, refused, check, bad) = (&spans[0].1, &spans[1].1, &spans[2].1, &spans[3].1);
    assert_eq!(ok["call"], "admit");
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["reason"], "none");
    assert!(ok["store_us"].parse::<u64>().is_ok(), "{ok:?}");
    assert_eq!(refused["status"], "exceeded");
    assert_eq!(refused["reason"], "limit_exceeded");
    assert_eq!(refused["binding"], "tokens");
    assert_eq!(check["call"], "check");
    // The same subject, the same digest; bad input is an error on its span.
    assert_eq!(ok["subject"], check["subject"]);
    assert_ne!(ok["subject"], bad["subject"]);
    assert_eq!(bad["error"], "unknown_subject");
    assert!(!bad.contains_key("status"));
}

#[test]
fn renew_and_usage_have_spans() {
    let engine = engine();
    let spans = Spans::default();
    let keep = Keep {
        spans: spans.clone(),
        next: AtomicU64::new(0),
    };
    let ttl = std::time::Duration::from_secs(60);
    let mut r = engine
        .reserve(&Request::new("agent-secret-7").units("jobs", 1), ttl)
        .unwrap()
        .unwrap();
    tracing::subscriber::with_default(keep, || {
        engine.renew(&mut r, ttl).unwrap();
        engine.usage("agent-secret-7").unwrap();
        assert!(engine.usage("nobody").is_err());
    });
    let spans = spans.lock().unwrap();
    assert_eq!(spans.len(), 3, "{spans:?}");
    let (renew, usage, bad) = (&spans[0].1, &spans[1].1, &spans[2].1);
    assert_eq!(renew["call"], "renew");
    assert!(renew["store_us"].parse::<u64>().is_ok(), "{renew:?}");
    assert_eq!(usage["call"], "usage");
    assert!(usage["store_us"].parse::<u64>().is_ok(), "{usage:?}");
    assert_eq!(renew["subject"], usage["subject"]);
    assert_eq!(bad["call"], "usage");
    assert_eq!(bad["error"], "unknown_subject");
    // They decide nothing: no status.
    assert!(!renew.contains_key("status") && !usage.contains_key("status"));
}
