//! tollgate: embeddable quota enforcement for Rust services.
//!
//! A service describes its plans (tokens per day, jobs per day, a monthly
//! cost cap, 5 hours of runtime per rolling 7 days), binds each subject to a
//! plan, and before every piece of paid work asks: *may this subject spend
//! this much now?* The answer is a [`Decision`]: `Ok`, `Warning` or
//! `Exceeded`, with the numbers behind it.
//!
//! ```
//! use tollgate::{Allocation, Catalog, Engine, Request, Status};
//!
//! let catalog: Catalog = serde_json::from_str(r#"{
//!   "meters": [{"id": "llm_tokens_input", "unit": "count"}],
//!   "plans": [{"id": "plan_free", "limits": [
//!     {"meter": "llm_tokens_input", "window": {"calendar": {"period": "month"}}, "max": 20000}
//!   ]}]
//! }"#)?;
//! let engine = Engine::new(catalog);
//! engine.allocate(Allocation::new("agent-7", "plan_free"))?;
//!
//! // Check and record in one atomic step.
//! let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", 1_200))?;
//! assert!(d.allowed);
//! assert_eq!(d.status, Status::Ok);
//! assert_eq!(d.limits[0].remaining, Some(18_800));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The calls
//!
//! | call | what it does | counters |
//! | --- | --- | --- |
//! | [`Engine::check`] | preflight: what would `admit` decide | untouched |
//! | [`Engine::admit`] | atomic check-then-record over every limit of every scope | all added, or none |
//! | [`Engine::record`] | usage that already happened | always added; may be `Exceeded` |
//! | [`Engine::usage`] | units, holds and cost per meter for the current periods | untouched |
//! | [`Engine::reserve`] | hold estimates and a concurrency slot under a lease | all held, or none |
//! | [`Engine::renew`] / [`Engine::grow`] | extend the lease; add to the holds | holds |
//! | [`Engine::commit`] | give back the holds and record the actual amounts | one step |
//! | [`Engine::release`] | give back the holds, keep the refund policy's share | one step |
//!
//! # Semantics
//!
//! - **Status.** `Exceeded` when a positive request would take usage past a
//!   maximum (`admit` then records nothing). `Warning` when usage after the
//!   request is positive and reaches the limit's warning ratio (default 0.8,
//!   so 16,000 of 20,000 is `Warning` and 15,999 is `Ok`). `Ok` otherwise. A
//!   request whose amounts are all zero is never `Exceeded` and never refused
//!   for a cooldown; a model outside the allowlist still refuses it, with
//!   status `Ok`.
//! - **Maximum.** `-1` or `"unlimited"`: counted, never refused. `0`: not
//!   available, any positive use is refused. Otherwise an amount.
//! - **Windows.** [`Window::Calendar`] resets at the start of each day, week
//!   (Monday) or month, in UTC or a fixed offset. [`Window::Rolling`] keeps a
//!   span in a fixed number of buckets: memory does not grow with traffic, and
//!   usage leaves at most one bucket late, never early. [`Window::Lifetime`]
//!   never resets. [`Window::Concurrent`] counts live reservations.
//! - **Reservations.** Holds count for every caller at once (a limit fits
//!   while `used + held + request <= max`) and return by themselves when a
//!   lease expires unrenewed. See [`Engine::reserve`].
//! - **Money** is exact: [`rust_decimal::Decimal`] in, integers of the money
//!   meter's smallest unit inside. A request's cost is Σ units × unit price,
//!   rounded **up** once, so a charge never rounds down to zero. Meters without
//!   a price cost 0 and are listed in [`Decision::unpriced`]. Every amount
//!   has one public form, [`Amount`]: `u64` for counts and seconds, a
//!   `Decimal` of the major unit for money (a $0.99 cost reads `0.99`, 1,200
//!   tokens `1200`), never a float. A [`LimitState`] keeps the store's exact
//!   integers in the meter's smallest unit (`used` is 990,000 for $0.99 at
//!   scale 6) and reads them in the public form through `used_amount`,
//!   `held_amount`, `max_amount`, …; a usage report's [`MeterUsage`] has the
//!   same accessors with the same answers, and [`Decision::cost`] is
//!   [`Money`] in the same form.
//! - **Scopes.** A request is checked against its subject's limits, the pools
//!   its allocation draws on, and the global pools of the model it names —
//!   all or nothing.
//! - **Errors.** A refusal is a [`Decision`], never an `Err`. `Err` is bad
//!   input or a failing store, and then nothing changed.
//!
//! # Storage
//!
//! [`AllowanceStore`] is the one trait a backend implements; see the
//! [`store`] module for its contract. [`MemoryStore`] is the embedded
//! default.
//!
//! # Features
//!
//! The default build carries only the core: serde, thiserror, chrono,
//! parking_lot, rust_decimal, fnv (event fingerprints), smallvec (a
//! decision's inline lists, behind [`LimitStates`] and [`MeterList`]) and
//! foldhash (the engine's keyed hash of subject ids).
//!
//! | feature | adds | dependencies |
//! | --- | --- | --- |
//! | `http` | `http`: a [`Decision`] as an HTTP status (402 for a quota or cost cap, 429 for a rate, 403 for a model outside the allowlist), `Retry-After`, `X-Quota-Warning`, the IETF `RateLimit` / `RateLimit-Policy` fields and a JSON refusal body | `http`, `serde_json` |
//! | `tower` | `tower`: `QuotaLayer` / `Quota<S>` middleware with route gates (method + path pattern → meters), subject lookup, reads that pass when exceeded, and usage recorded after the response; implies `http` | `tower-layer`, `tower-service`, `pin-project-lite` |
//! | `conformance` | `conformance`: the [`AllowanceStore`] conformance suite, for a backend's own tests | none |
//! | `async` | `async`: `store::AsyncAllowanceStore` and the engine's `*_async` calls (`admit_async`, `reserve_async`, …), with a fail-open or fail-closed `store::FailurePolicy`; `MemoryStore` serves both forms. A feature because `async-trait` brings `syn` with its full parser | `async-trait` |
//! | `metrics` | decisions by call, status and reason, store latency, store errors, fail-open and outcome-unknown counts, lease expiries and reservations in flight, on the `metrics` facade (names in the README) | `metrics` |
//! | `tracing` | a DEBUG span `tollgate.call` per engine call: call, status, refusal reason, binding meter, store latency; the subject only as a digest | `tracing` |
//! | `cli` | the `tollgate` binary: `check` a catalog, `replay` a usage log against plans, `usage` of a snapshot | `clap`, `indicatif`, `toml`, `serde_json`, `serde_path_to_error` |
//! | `redis` | `redis`: `store::RedisStore`, counters shared by many replicas, one Lua script and one round trip per decision; implies `async`. redis-rs 1.x needs Rust 1.88 | `redis` (tokio), `tokio` (time), `sha2` |
//! | `postgres` | `postgres`: `store::PostgresStore`, durable counters in the host's PostgreSQL, schema shipped as SQL migrations (`migrate()`), one server-side function call and one round trip per decision; implies `async` | `tokio-postgres`, `deadpool-postgres`, `tokio` (time), `serde_json` |

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
pub mod capacity;
mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
mod engine;
mod error;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
mod inline;
mod model;
pub mod store;
mod telemetry;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

// The model's modules at their old crate paths (`crate::catalog::…`), which
// the engine and the stores name.
pub(crate) use model::{catalog, decision, name, request, window};

pub use clock::{Clock, ClockStep, ManualClock, SystemClock};
#[cfg(feature = "async")]
pub use engine::AsyncAllocationSource;
pub use engine::{
    Allocation, AllocationSource, AuditChange, AuditEvent, AuditPart, Call, Credit, DecisionEvent,
    Engine, MemoryAllocations, MeterUsage, Observer, Outcome, Reservation, TopUp, UsageReport,
    MAX_PAYMENT_ID_BYTES,
};
pub use error::Error;
pub use model::catalog::{
    BalanceConfig, Catalog, CatalogConfig, Limit, LimitConfig, MaxConfig, Meter, Plan, PlanConfig,
    Pool, PoolConfig, RefundPolicy, Unit, DEFAULT_WARN_AT, MAX_MONEY_SCALE, MAX_PRICE_SCALE,
};
pub use model::decision::{
    Amount, Balance, Decision, Grant, LimitState, LimitStates, MeterList, Money, Refusal, Status,
};
pub use model::lease::LeaseId;
pub use model::name::Name;
pub use model::request::{Quantity, Request};
pub use model::scope::ScopeKey;
pub use model::window::{Period, Window, WindowConfig};
pub use store::{AllowanceStore, LeaseInfo, MemoryStore, Snapshot};

// Compile the README's example as a doctest so it cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
