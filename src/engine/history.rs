//! Reports of past calendar periods: [`Engine::usage_in`] and its async
//! twin, over contract rule 11 of the [store](crate::store).

use chrono::{DateTime, Utc};

use super::allocations::Resolved;
use super::conclude::{charged_money, report_status};
use super::{Engine, MeterUsage, UsageReport};
use crate::catalog::CostMeter;
use crate::clock::Clock;
use crate::decision::Scale;
use crate::store::AllowanceStore;
use crate::window::{Period, Window};
use crate::Error;

/// A report of the current periods narrowed to the limits kept per
/// calendar `period`: [`Engine::usage_in`] with `back` 0.
fn current_only(mut report: UsageReport, period: Period) -> UsageReport {
    report
        .meters
        .retain(|m| matches!(m.window, Window::Calendar { period: p, .. } if p == period));
    report
}

/// The body of `usage_in` and `usage_in_async`: `$kept` is the store's
/// depth, `$read` its answer to the ops (`|$ops, $now_ms|`, may `.await`).
macro_rules! usage_in_call {
    (
        $engine:ident, $subject:ident, $period:ident, $back:ident,
        kept: $kept:expr,
        read: |$ops:ident, $now_ms:ident| $read:expr $(,)?
    ) => {{
        let mut watch =
            $crate::telemetry::Watch::new($crate::engine::observe::Call::Usage, $subject);
        let kept: u32 = $kept;
        if $back > kept {
            let e = Error::HistoryNotKept {
                asked: $back,
                kept,
            };
            watch.failed(&e);
            return Err(e);
        }
        let alloc = match $engine.allocation_of($subject) {
            Ok(a) => a,
            Err(e) => {
                watch.failed(&e);
                return Err(e);
            }
        };
        let now = $engine.clock.now();
        let $now_ms = now.timestamp_millis();
        let cms = super::plan::cost_meters(&$engine.catalog, &alloc);
        let (ops, rows, charged) = super::plan::period_ops(&alloc, &cms, $period, $back, $now_ms);
        let used = watched_store_call!(watch, |$ops| &ops[..] => $read);
        let report =
            $engine.past_report($subject, &alloc, &ops, &rows, &cms, &charged, &used, now);
        if let Err(ref e) = report {
            watch.failed(e);
        }
        report
    }};
}

impl<S: AllowanceStore, C: Clock> Engine<S, C> {
    /// Usage for `subject` in the calendar period `back` periods before the
    /// current one, for each of its own limits kept per `period`: in April,
    /// `usage_in(subject, Period::Month, 1)` is March's report. `back` 0 is
    /// the current period ([`Engine::usage`]'s rows for those limits, holds
    /// included).
    ///
    /// A past period's row has its period's bounds (`period_start`,
    /// `resets_at` its end), the usage counted in it, nothing held, and the
    /// money charged for it **as charged** ([`MeterUsage::cost`](super::MeterUsage::cost)). The
    /// limits read are those of the subject's plan now: the maximum and
    /// status are today's, and a counter of a limit the plan no longer has
    /// is not read. Periods are counted from the engine's clock.
    ///
    /// How far back reports reach is the store's
    /// [`history_periods`](AllowanceStore::history_periods) (contract rule
    /// 11): [`MemoryStore`](crate::MemoryStore) keeps the one period before
    /// the current by default
    /// ([`with_history_periods`](crate::MemoryStore::with_history_periods)).
    ///
    /// # Errors
    /// [`Error::HistoryNotKept`] when `back` is past what the store keeps
    /// (nothing is read); [`Error::UnknownSubject`]; a failing store.
    pub fn usage_in(&self, subject: &str, period: Period, back: u32) -> Result<UsageReport, Error> {
        if back == 0 {
            return self.usage(subject).map(|r| current_only(r, period));
        }
        usage_in_call!(self, subject, period, back,
            kept: self.store.history_periods(),
            read: |ops, now_ms| self.store.period_usage(ops, now_ms))
    }
}

#[cfg(feature = "async")]
impl<S: crate::store::AsyncAllowanceStore, C: Clock> Engine<S, C> {
    /// [`Engine::usage_in`] on an async store.
    ///
    /// # Errors
    /// As [`Engine::usage_in`]; a failing store fails the call whatever the
    /// failure policy.
    pub async fn usage_in_async(
        &self,
        subject: &str,
        period: Period,
        back: u32,
    ) -> Result<UsageReport, Error> {
        self.refresh_async(subject).await?;
        if back == 0 {
            return self
                .usage_async(subject)
                .await
                .map(|r| current_only(r, period));
        }
        usage_in_call!(self, subject, period, back,
            kept: self.store.history_periods(),
            read: |ops, now_ms| self.store.period_usage(ops, now_ms).await)
    }
}

impl<S, C: Clock> Engine<S, C> {
    /// The report [`Engine::usage_in`] (and its async twin) answers for a
    /// closed period, from the store's answer (`used`, one per op) to
    /// [`period_ops`](super::plan::period_ops): one row per limit read
    /// (`rows`, indexes into the allocation's limits), with its period's
    /// bounds, its usage and the money charged for it, nothing held.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn past_report(
        &self,
        subject: &str,
        alloc: &Resolved,
        ops: &[crate::store::PeriodOp<'_>],
        rows: &[usize],
        cms: &[CostMeter],
        charged: &[Option<usize>],
        used: &[u64],
        now: DateTime<Utc>,
    ) -> Result<UsageReport, Error> {
        if used.len() != ops.len() {
            return Err(Error::Store {
                message: format!(
                    "store returned {} period totals for {} periods",
                    used.len(),
                    ops.len()
                ),
            });
        }
        let limits = alloc.limits();
        let meters = rows
            .iter()
            .zip(ops)
            .zip(used)
            .zip(charged)
            .map(|(((&i, op), &units), c)| {
                let l = &limits[i];
                let meter = &self.catalog.meters[l.meter_idx];
                let priced = alloc.plan.price_units_of(l.meter_idx).is_some();
                let cost = c.and_then(|first| {
                    charged_money(alloc, cms, priced, |k| {
                        used.get(first + k).copied().unwrap_or(0)
                    })
                });
                MeterUsage {
                    meter: l.meter,
                    window: l.window,
                    period_start: Some(crate::store::ms_to_time(op.start_ms)),
                    resets_at: op.end_ms().map(crate::store::ms_to_time),
                    units: meter.to_decimal(units),
                    held: meter.to_decimal(0),
                    max: l.max.map(|m| meter.to_decimal(m)),
                    cost,
                    status: report_status(l, units),
                    scale: Scale::of(&meter.unit),
                    used_minor: units,
                    held_minor: 0,
                    max_minor: l.max,
                }
            })
            .collect();
        Ok(UsageReport {
            subject: subject.to_owned(),
            plan: alloc.plan.id.to_string(),
            at: now,
            meters,
            balance: None,
        })
    }
}
