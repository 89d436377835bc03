//! The seed-002 agent runner on tollgate: each job start reserves its token
//! estimate, one of the day's jobs and a concurrency slot; a finished job
//! commits its actual tokens; a failed job returns 50 % of its hold and
//! starts the repository's cooldown; a cancelled job returns 100 %; a job
//! past its maximum duration is reported so the runner can kill it.
//!
//! Run with `cargo run --example agent_runner`. Time is a manual clock, so
//! the run is the same every time.

use std::time::Duration as StdDuration;

use chrono::{TimeZone, Utc};
use tollgate::{
    Allocation, CatalogConfig, Decision, Engine, LimitConfig, ManualClock, Meter, Outcome, Period,
    PlanConfig, PoolConfig, Request, Window,
};

const LEASE: StdDuration = StdDuration::from_secs(300);

fn line(what: &str, d: &Decision) {
    let tokens = d.limits.iter().find(|l| &*l.meter == "tokens");
    let slots = d.limits.iter().find(|l| &*l.meter == "concurrent_jobs");
    println!(
        "{what:<44} {:<8} tokens used {:>6} held {:>6} | slots held {}",
        format!("{:?}", d.status),
        tokens.map_or(0, |l| l.used),
        tokens.map_or(0, |l| l.held),
        slots.map_or(0, |l| l.held),
    );
}

fn main() -> Result<(), tollgate::Error> {
    let day = Window::calendar(Period::Day);
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .meter(Meter::count("jobs"))
        .meter(Meter::count("concurrent_jobs"))
        .plan(
            PlanConfig::new("agent")
                .limit(LimitConfig::new("tokens", day, 100_000u64))
                .limit(LimitConfig::new("jobs", day, 10u64))
                .limit(LimitConfig::new(
                    "concurrent_jobs",
                    Window::Concurrent,
                    2u64,
                ))
                .max_job_duration("30m"),
        )
        .pool(PoolConfig::new("repo:acme/api").cooldown_after_failure("15m"))
        .build()?;
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).unwrap());
    let engine = Engine::with_clock(catalog, clock.clone());
    engine.allocate(Allocation::new("agent-7", "agent"))?;

    let job = |tokens| {
        Request::new("agent-7")
            .units("tokens", tokens)
            .units("jobs", 1)
            .pool("repo:acme/api")
    };

    // Two jobs start; a third is refused: only two may run at once.
    let a = engine.reserve(&job(20_000), LEASE)?.expect("job a starts");
    line("start job a (estimate 20,000)", a.decision());
    let mut b = engine.reserve(&job(30_000), LEASE)?.expect("job b starts");
    line("start job b (estimate 30,000)", b.decision());
    let refused = engine.reserve(&job(10_000), LEASE)?.unwrap_err();
    line("start job c: refused, no free slot", &refused);

    // Job a completes having used 12,500 tokens: the difference returns.
    clock.advance(StdDuration::from_secs(60));
    // `actual` is the job's whole usage: it names the job too.
    let actual = Request::new("agent-7")
        .units("tokens", 12_500)
        .units("jobs", 1);
    let d = engine.commit(&a, &actual)?;
    line("job a completes, actual 12,500", &d);

    // Job b keeps running and heartbeats; job c fails and returns 50 %.
    engine.renew(&mut b, LEASE)?;
    let c = engine.reserve(&job(10_000), LEASE)?.expect("job c starts");
    line("start job c (estimate 10,000)", c.decision());
    let d = engine.release(&c, Outcome::Failed)?;
    line("job c fails: 50 % of 10,000 returns", &d);

    // The failure cools the repository down for 15 minutes.
    let d = engine.reserve(&job(5_000), LEASE)?.unwrap_err();
    line("start job d: repository cooling down", &d);
    println!(
        "{:<44} reason {:?}, retry after {:?}",
        "",
        d.reason,
        d.retry_after.unwrap_or_default()
    );

    // Job b runs past its 30 minute maximum, heartbeating all the while.
    for _ in 0..16 {
        clock.advance(StdDuration::from_secs(120));
        engine.renew(&mut b, LEASE)?;
    }
    for lease in engine.overdue()? {
        println!(
            "{:<44} lease {} of {} ran past {}",
            "overdue: kill it",
            lease.id,
            lease.owner,
            lease.deadline.map(|t| t.to_rfc3339()).unwrap_or_default()
        );
    }
    let d = engine.release(&b, Outcome::Cancelled)?;
    line("job b killed: cancelled, 100 % returns", &d);

    let report = engine.usage("agent-7")?;
    for row in &report.meters {
        println!(
            "usage {:<16} {:>8} used {:>6} held (max {})",
            row.meter,
            row.units,
            row.held,
            row.max.map_or("unlimited".into(), |m| m.to_string())
        );
    }
    Ok(())
}
