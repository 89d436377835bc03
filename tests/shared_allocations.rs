//! Allocations shared by replicas through an `AllocationSource`, with a
//! bounded-staleness cache, and the audit of every change.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::{
    Allocation, AllocationSource, AuditChange, AuditEvent, AuditPart, Catalog, DecisionEvent,
    Engine, Error, LimitConfig, ManualClock, MemoryAllocations, MemoryStore, Observer, Period,
    Request, Status, Window,
};

fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
      "meters": [{"id": "jobs", "unit": "count"}],
      "plans": [
        {"id": "free", "limits": [{"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": 10}]},
        {"id": "plus", "limits": [{"meter": "jobs", "window": {"calendar": {"period": "day"}}, "max": 100}]}
      ]
    }"#,
    )
    .unwrap()
}

fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap())
}

const MAX_AGE: Duration = Duration::from_secs(5);

type Replica = Engine<Arc<MemoryStore>, ManualClock>;

/// Two replicas on one store, one clock and one allocation source.
fn replicas(source: &MemoryAllocations) -> (Replica, Replica, ManualClock) {
    let (store, clock) = (Arc::new(MemoryStore::new()), clock());
    let engine = || {
        Engine::with_store_and_clock(catalog(), store.clone(), clock.clone())
            .with_allocation_source(source.clone(), MAX_AGE)
    };
    (engine(), engine(), clock)
}

fn jobs(n: u64) -> Request<'static> {
    Request::new("sk-live-1").units("jobs", n)
}

#[derive(Default, Clone)]
struct Audits(Arc<Mutex<Vec<AuditEvent>>>);

impl Observer for Audits {
    fn on_decision(&self, _: &DecisionEvent<'_>) {}
    fn on_audit(&self, event: &AuditEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl Audits {
    fn take(&self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

#[test]
fn a_replica_started_later_knows_every_allocation() {
    let source = MemoryAllocations::new();
    let (a, _, clock) = replicas(&source);
    a.allocate(Allocation::new("sk-live-1", "free")).unwrap();
    assert!(a.admit(&jobs(4)).unwrap().allowed);

    // Started after the allocation was made, on the same store.
    let late = Engine::with_store_and_clock(catalog(), a.store().clone(), clock)
        .with_allocation_source(source.clone(), MAX_AGE);
    assert_eq!(late.allocation("sk-live-1"), None, "nothing cached yet");
    let d = late.admit(&jobs(6)).unwrap();
    assert!(d.allowed);
    assert_eq!(d.limits[0].used, 10, "counters shared, plan loaded");
    assert!(!late.admit(&jobs(1)).unwrap().allowed);
    assert_eq!(
        late.allocation("sk-live-1"),
        Some(Allocation::new("sk-live-1", "free"))
    );
}

#[test]
fn a_change_through_one_replica_is_enforced_by_all_within_max_age() {
    let source = MemoryAllocations::new();
    let (a, b, clock) = replicas(&source);
    a.allocate(Allocation::new("sk-live-1", "free")).unwrap();
    assert_eq!(b.admit(&jobs(10)).unwrap().status, Status::Warning);
    assert!(!b.admit(&jobs(1)).unwrap().allowed);

    // Raise the cap through replica a.
    a.allocate(
        Allocation::new("sk-live-1", "free").with_override(LimitConfig::new(
            "jobs",
            Window::calendar(Period::Day),
            20u64,
        )),
    )
    .unwrap();
    assert!(a.admit(&jobs(1)).unwrap().allowed, "a enforces it at once");
    // b's copy is younger than max_age: still the old cap.
    clock.advance(MAX_AGE - Duration::from_millis(1));
    assert!(!b.admit(&jobs(1)).unwrap().allowed);
    // At max_age it loads the new one.
    clock.advance(Duration::from_millis(1));
    let d = b.admit(&jobs(1)).unwrap();
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.limits[0].max, Some(20));
    assert_eq!(d.limits[0].used, 12);

    // A removal through a: b refuses the subject after max_age.
    assert!(a.deallocate("sk-live-1").unwrap());
    assert!(b.check(&jobs(1)).is_ok());
    clock.advance(MAX_AGE);
    assert_eq!(
        b.check(&jobs(1)).unwrap_err(),
        Error::UnknownSubject {
            subject: "sk-live-1".into()
        }
    );
    assert_eq!(b.allocation("sk-live-1"), None);
}

#[test]
fn a_bad_allocation_from_the_source_is_refused_and_the_old_one_stays() {
    let source = MemoryAllocations::new();
    let (a, b, clock) = replicas(&source);
    let audits = Audits::default();
    let b = b.with_observer(audits.clone());

    // Nothing cached: the call fails naming the subject.
    AllocationSource::save(&source, &Allocation::new("sk-live-1", "gold")).unwrap();
    let err = b.admit(&jobs(1)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidAllocation { subject, reason }
            if subject == "sk-live-1" && reason.contains("gold")),
        "{err:?}"
    );
    assert_eq!(b.allocation("sk-live-1"), None);

    // Something cached: it stays in force.
    a.allocate(Allocation::new("sk-live-1", "free")).unwrap();
    let d = b.admit(&jobs(3)).unwrap();
    assert_eq!(d.limits[0].used, 3, "the refused call counted nothing");
    AllocationSource::save(
        &source,
        &Allocation::new("sk-live-1", "free").with_pool("no-such-pool"),
    )
    .unwrap();
    clock.advance(MAX_AGE);
    let d = b.admit(&jobs(2)).unwrap();
    assert!(d.allowed);
    assert_eq!((d.limits[0].used, d.limits[0].max), (5, Some(10)));
    assert_eq!(
        b.allocation("sk-live-1"),
        Some(Allocation::new("sk-live-1", "free"))
    );
    let seen = audits.take();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|e| e.subject == "sk-live-1"
        && matches!(e.change, AuditChange::Rejected { .. })
        && e.new.is_none()));
    assert_eq!(seen[1].old, Some(Allocation::new("sk-live-1", "free")));
    // Refused once per max_age, not on every call.
    assert!(b.admit(&jobs(1)).unwrap().allowed);
    assert!(audits.take().is_empty());
}

/// A source that can be made to fail.
#[derive(Default, Clone)]
struct Flaky {
    inner: MemoryAllocations,
    down: Arc<Mutex<bool>>,
}

impl Flaky {
    fn check(&self) -> Result<(), Error> {
        if *self.down.lock().unwrap() {
            return Err(Error::Store {
                message: "source down".into(),
            });
        }
        Ok(())
    }
}

impl AllocationSource for Flaky {
    fn load(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        self.check()?;
        AllocationSource::load(&self.inner, subject)
    }
    fn save(&self, allocation: &Allocation) -> Result<Option<Allocation>, Error> {
        self.check()?;
        AllocationSource::save(&self.inner, allocation)
    }
    fn remove(&self, subject: &str) -> Result<Option<Allocation>, Error> {
        self.check()?;
        AllocationSource::remove(&self.inner, subject)
    }
}

#[test]
fn a_failing_source_changes_nothing_and_keeps_what_is_cached() {
    let source = Flaky::default();
    let clock = clock();
    let audits = Audits::default();
    let e = Engine::with_clock(catalog(), clock.clone())
        .with_allocation_source(source.clone(), MAX_AGE)
        .with_observer(audits.clone());
    e.allocate(Allocation::new("sk-live-1", "free")).unwrap();
    assert_eq!(audits.take().len(), 1);

    *source.down.lock().unwrap() = true;
    // Writes fail and change nothing, here or in the source.
    let err = e
        .allocate(Allocation::new("sk-live-1", "plus"))
        .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert!(matches!(
        e.deallocate("sk-live-1").unwrap_err(),
        Error::Store { .. }
    ));
    assert_eq!(
        e.allocation("sk-live-1"),
        Some(Allocation::new("sk-live-1", "free"))
    );
    assert!(audits.take().is_empty());
    // A stale copy stays in force while the source is down.
    clock.advance(MAX_AGE * 3);
    let d = e.admit(&jobs(1)).unwrap();
    assert_eq!(d.limits[0].max, Some(10));
    // With nothing cached the source's error is the answer.
    assert!(matches!(
        e.admit(&Request::new("other").units("jobs", 1))
            .unwrap_err(),
        Error::Store { .. }
    ));
    *source.down.lock().unwrap() = false;
    assert_eq!(
        AllocationSource::load(&source, "sk-live-1").unwrap(),
        Some(Allocation::new("sk-live-1", "free"))
    );
}

#[test]
fn every_change_is_audited_with_old_new_when_and_who() {
    let source = MemoryAllocations::new();
    let (a, b, clock) = replicas(&source);
    let audits = Audits::default();
    let a = a.with_observer(audits.clone());
    let b = b.with_observer(audits.clone());

    a.allocate_as(Allocation::new("sk-live-1", "free"), "ops@acme")
        .unwrap();
    let cap = |max: u64| LimitConfig::new("jobs", Window::calendar(Period::Day), max);
    clock.advance(Duration::from_secs(60));
    b.allocate_as(
        Allocation::new("sk-live-1", "plus").with_override(cap(50)),
        "billing-webhook",
    )
    .unwrap();
    a.allocate(Allocation::new("sk-live-1", "plus").with_override(cap(80)))
        .unwrap();
    // The same allocation again changes nothing: no event.
    a.allocate(Allocation::new("sk-live-1", "plus").with_override(cap(80)))
        .unwrap();
    b.deallocate_as("sk-live-1", "ops@acme").unwrap();
    // b loads nothing it has to audit; a replica that only loads is silent.
    assert!(!b.deallocate("sk-live-1").unwrap());

    let seen = audits.take();
    assert_eq!(seen.len(), 4, "{seen:#?}");
    let t0 = Utc.with_ymd_and_hms(2026, 4, 8, 12, 0, 0).unwrap();
    assert_eq!(seen[0].change, AuditChange::Allocated);
    assert_eq!(
        (seen[0].actor.as_deref(), seen[0].at, seen[0].old.as_ref()),
        (Some("ops@acme"), t0, None)
    );
    assert_eq!(
        seen[1].change,
        AuditChange::Changed {
            parts: vec![
                AuditPart::Plan {
                    old: "free".into(),
                    new: "plus".into()
                },
                AuditPart::Override {
                    meter: "jobs".into(),
                    old: None,
                    new: Some(cap(50))
                },
            ]
        }
    );
    // The old value is the source's, though b had cached nothing.
    assert_eq!(seen[1].old, Some(Allocation::new("sk-live-1", "free")));
    assert_eq!(seen[1].at, t0 + chrono::Duration::seconds(60));
    assert_eq!(seen[1].actor.as_deref(), Some("billing-webhook"));
    assert_eq!(
        seen[2].change,
        AuditChange::Changed {
            parts: vec![AuditPart::Override {
                meter: "jobs".into(),
                old: Some(cap(50)),
                new: Some(cap(80))
            }]
        }
    );
    assert_eq!(seen[2].actor, None);
    assert_eq!(seen[3].change, AuditChange::Removed);
    assert_eq!(
        seen[3].old,
        Some(Allocation::new("sk-live-1", "plus").with_override(cap(80)))
    );
    assert_eq!(seen[3].new, None);
    // Audit events serialize for a log.
    let json = serde_json::to_value(&seen[2]).unwrap();
    assert_eq!(json["change"]["kind"], "changed");
    assert_eq!(json["change"]["parts"][0]["part"], "override");
    assert_eq!(json["change"]["parts"][0]["new"]["max"], 80);
}

#[test]
fn an_engine_without_a_source_audits_its_own_changes() {
    let audits = Audits::default();
    let e = Engine::with_clock(catalog(), clock()).with_observer(audits.clone());
    e.allocate(Allocation::new("u", "free")).unwrap();
    e.allocate(Allocation::new("u", "plus").with_models(["m1"]))
        .unwrap();
    assert!(e.deallocate("u").unwrap());
    assert!(!e.deallocate("u").unwrap());
    // A refused allocation changes nothing and is not audited.
    assert!(e.allocate(Allocation::new("u", "gold")).is_err());
    let seen = audits.take();
    let changes: Vec<_> = seen.iter().map(|e| e.change.clone()).collect();
    assert_eq!(
        changes,
        vec![
            AuditChange::Allocated,
            AuditChange::Changed {
                parts: vec![
                    AuditPart::Plan {
                        old: "free".into(),
                        new: "plus".into()
                    },
                    AuditPart::Models {
                        old: None,
                        new: Some(vec!["m1".into()])
                    },
                ]
            },
            AuditChange::Removed,
        ]
    );
    assert_eq!(e.allocation("u"), None);
}

#[test]
fn a_clock_step_back_does_not_stretch_the_staleness_bound() {
    let source = MemoryAllocations::new();
    let (a, b, clock) = replicas(&source);
    a.allocate(Allocation::new("sk-live-1", "free")).unwrap();
    assert_eq!(b.check(&jobs(1)).unwrap().limits[0].max, Some(10));
    a.allocate(Allocation::new("sk-live-1", "plus")).unwrap();
    // Back an hour: b's copy was loaded "in the future"; it is reloaded
    // now, not an hour and max_age from now.
    clock.rewind(Duration::from_secs(3_600));
    let d = b.check(&jobs(1)).unwrap();
    assert_eq!((&*d.plan, d.limits[0].max), ("plus", Some(100)));
}
