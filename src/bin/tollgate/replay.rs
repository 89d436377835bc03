//! `tollgate replay`: a usage log through a memory engine on a manual clock.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};

use chrono::DateTime;
use foldhash::fast::RandomState;
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use tollgate::{
    Allocation, Catalog, Decision, Engine, LimitState, ManualClock, Name, Refusal, Request,
    ScopeKey, TopUp, Window,
};

use crate::chart::Series;
use crate::log::{self, CsvHeader, Event, Num};

/// What the replay is asked to do.
#[derive(Debug)]
pub struct Options {
    /// The log.
    pub log: PathBuf,
    /// `SUBJECT=PLAN` (or `*=PLAN`) assignments.
    pub plans: Vec<(String, String)>,
    /// Stop at the first bad line.
    pub strict: bool,
    /// Keep each limit's use over time (for `--chart`).
    pub chart: bool,
    /// Show a progress bar for large logs on a terminal.
    pub progress: bool,
    /// What each prepaid balance starts with (in its plan's currency);
    /// `None`: a credit no log spends, so balances do not refuse.
    pub balance: Option<Decimal>,
}

/// A bad line: its number (from 1) and why.
#[derive(Debug, Clone)]
pub struct BadLine {
    /// Line number, from 1.
    pub line: u64,
    /// What was wrong.
    pub reason: String,
}

/// Why a request was refused: the reason and, for a limit, the binding meter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefusalKey {
    /// `limit_exceeded`, `model_not_allowed`, `cooldown` or `insufficient_balance`.
    pub reason: &'static str,
    /// The binding limit's meter, for `limit_exceeded`.
    pub meter: Option<String>,
}

/// The highest use a limit reached.
#[derive(Debug, Clone)]
pub struct Peak {
    /// The limit's scope.
    pub scope: ScopeKey,
    /// Its meter.
    pub meter: Name,
    /// Its window.
    pub window: Window,
    /// Its maximum, in the meter's smallest unit.
    pub max: Option<u64>,
    /// The highest `used + held` seen, in the meter's smallest unit.
    pub peak: u64,
    /// The meter's money scale, for money.
    pub scale: Option<u32>,
}

/// Counts for a subject, or for a plan's subjects together.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Requests replayed.
    pub requests: u64,
    /// Requests admitted.
    pub admitted: u64,
    /// Requests whose event id was seen before: the engine answered with the
    /// first decision and recorded nothing, so their cost is not counted.
    pub duplicates: u64,
    /// Refused requests by reason and meter.
    pub refused: Vec<(RefusalKey, u64)>,
    /// Cost recorded, with its currency.
    pub cost: Option<(Decimal, Name)>,
    /// Peak use per limit.
    pub peaks: Vec<Peak>,
}

impl Tally {
    fn count(&mut self, d: &Decision, duplicate: bool) {
        self.requests += 1;
        self.duplicates += u64::from(duplicate);
        if d.allowed {
            self.admitted += 1;
        } else {
            let key = refusal_key(d);
            match self.refused.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => self.refused.push((key, 1)),
            }
        }
        if d.recorded && !duplicate {
            if let Some(c) = &d.cost {
                match &mut self.cost {
                    Some((sum, _)) => *sum += c.amount,
                    None => self.cost = Some((c.amount, c.currency)),
                }
            }
        }
        for (i, l) in d.limits.as_slice().iter().enumerate() {
            self.peak(i, l);
        }
    }

    /// Raise the peak of `l`, the decision's `i`th limit.
    #[inline]
    fn peak(&mut self, i: usize, l: &LimitState) {
        let use_now = l.used.saturating_add(l.held);
        let same = |p: &Peak| p.meter == l.meter && p.window == l.window && p.scope == l.scope;
        // A subject's decisions list its limits in one order: its slot is
        // usually at the same index, checked before the scan.
        let at = match self.peaks.get(i) {
            Some(p) if same(p) => Some(i),
            _ => self.peaks.iter().position(same),
        };
        if let Some(p) = at.and_then(|at| self.peaks.get_mut(at)) {
            p.peak = p.peak.max(use_now);
            p.max = l.max;
            return;
        }
        self.peaks.push(Peak {
            scope: l.scope.clone(),
            meter: l.meter,
            window: l.window,
            max: l.max,
            peak: use_now,
            scale: l.money_scale(),
        });
    }

    /// Add `other` into this one (a plan's total over its subjects): counts
    /// add, peaks of subject limits merge per meter and window (the highest
    /// any subject reached), pool limits stay per pool.
    pub fn merge(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.admitted += other.admitted;
        self.duplicates += other.duplicates;
        for (k, n) in &other.refused {
            match self.refused.iter_mut().find(|(j, _)| j == k) {
                Some((_, m)) => *m += n,
                None => self.refused.push((k.clone(), *n)),
            }
        }
        if let Some((c, cur)) = &other.cost {
            match &mut self.cost {
                Some((sum, _)) => *sum += *c,
                None => self.cost = Some((*c, *cur)),
            }
        }
        for p in &other.peaks {
            let same = |q: &&mut Peak| {
                q.meter == p.meter
                    && q.window == p.window
                    && q.scope.kind() == p.scope.kind()
                    && (is_subject(&q.scope) || q.scope == p.scope)
            };
            match self.peaks.iter_mut().find(same) {
                Some(q) => {
                    q.peak = q.peak.max(p.peak);
                    q.max = q.max.max(p.max);
                }
                None => self.peaks.push(p.clone()),
            }
        }
    }
}

/// Whether a scope is a subject's own (not a pool).
pub fn is_subject(scope: &ScopeKey) -> bool {
    scope.to_string().starts_with("subject:")
}

fn refusal_key(d: &Decision) -> RefusalKey {
    match &d.reason {
        Some(Refusal::ModelNotAllowed { .. }) => RefusalKey {
            reason: "model_not_allowed",
            meter: None,
        },
        Some(Refusal::Cooldown { .. }) => RefusalKey {
            reason: "cooldown",
            meter: None,
        },
        Some(Refusal::InsufficientBalance { .. }) => RefusalKey {
            reason: "insufficient_balance",
            meter: None,
        },
        _ => RefusalKey {
            reason: "limit_exceeded",
            meter: d.binding_limit().map(|l| l.meter.to_string()),
        },
    }
}

/// A subject seen in the log.
#[derive(Debug)]
pub struct Subject {
    /// Its id.
    pub id: String,
    /// The plan it was put on.
    pub plan: String,
    /// Its counts.
    pub tally: Tally,
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Lines read (data lines, not a CSV header or blank lines).
    pub lines: u64,
    /// Subjects in order of first appearance.
    pub subjects: Vec<Subject>,
    /// Lines that did not parse or that the engine refused as bad input.
    pub bad: Vec<BadLine>,
    /// Whether `--strict` stopped the replay at a bad line.
    pub stopped: bool,
    /// Each limit's use over time, when asked for.
    pub series: Vec<Series>,
    /// First and last timestamp replayed.
    pub span: Option<(i64, i64)>,
}

/// The replay's state: engine, clock, subjects and their meters' units.
struct Replayer<'c> {
    engine: Engine<tollgate::MemoryStore, ManualClock>,
    clock: ManualClock,
    /// Each meter's currency (`None` for counts), scanned: cheaper than
    /// the catalog's map for a handful of meters.
    currencies: Vec<(&'c str, Option<&'c str>)>,
    catalog: &'c Catalog,
    assign: HashMap<String, String>,
    default_plan: Option<String>,
    index: HashMap<Box<str>, usize, RandomState>,
    out: Outcome,
    series: HashMap<(String, String), usize>,
    chart: bool,
    /// What each prepaid balance starts with (`Options::balance`).
    balance: Option<Decimal>,
    /// Event ids seen, per subject index.
    events: std::collections::HashSet<(usize, Box<str>), RandomState>,
}

impl<'c> Replayer<'c> {
    fn new(catalog: &'c Catalog, opts: &Options) -> Self {
        let clock = ManualClock::new(DateTime::UNIX_EPOCH);
        let engine = Engine::with_clock(catalog.clone(), clock.clone());
        let mut assign = HashMap::new();
        let mut default_plan = None;
        for (s, p) in &opts.plans {
            if s == "*" {
                default_plan = Some(p.clone());
            } else {
                assign.insert(s.clone(), p.clone());
            }
        }
        if default_plan.is_none() {
            default_plan = catalog.config().plans.first().map(|p| p.id.clone());
        }
        Self {
            engine,
            clock,
            currencies: catalog
                .config()
                .meters
                .iter()
                .map(|m| (m.id.as_str(), m.currency()))
                .collect(),
            catalog,
            assign,
            default_plan,
            index: HashMap::default(),
            out: Outcome::default(),
            series: HashMap::new(),
            chart: opts.chart,
            balance: opts.balance,
            events: Default::default(),
        }
    }

    /// The subject's index, allocating it on first sight.
    #[inline]
    fn subject(&mut self, id: &str) -> Result<usize, String> {
        if let Some(&i) = self.index.get(id) {
            return Ok(i);
        }
        let plan = self
            .assign
            .get(id)
            .or(self.default_plan.as_ref())
            .ok_or_else(|| format!("no plan for subject `{id}`"))?
            .clone();
        self.engine
            .allocate(Allocation::new(id, plan.as_str()))
            .map_err(|e| format!("subject `{id}`: {e}"))?;
        self.credit(id, &plan)?;
        let i = self.out.subjects.len();
        let tally = self.unused_limits(id, &plan);
        self.out.subjects.push(Subject {
            id: id.to_owned(),
            plan,
            tally,
        });
        self.index.insert(id.into(), i);
        Ok(i)
    }

    /// Credit the prepaid balance `id`'s plan spends from (once per
    /// balance: a pool's members share the payment id) with what the
    /// replay starts balances with.
    fn credit(&self, id: &str, plan: &str) -> Result<(), String> {
        let Some(p) = self.catalog.plan(plan).filter(|p| p.has_balance()) else {
            return Ok(());
        };
        let meter = p
            .cost_meter(self.catalog)
            .and_then(|m| self.catalog.meter(m))
            .ok_or_else(|| format!("plan `{plan}` keeps a balance without a cost meter"))?;
        let currency = meter.currency().unwrap_or_default();
        // Half of u64's range in the smallest unit: no log spends it, and
        // one grant can never overflow the balance.
        let amount = self.balance.unwrap_or_else(|| {
            Decimal::from_i128_with_scale(i128::from(u64::MAX / 2), meter.scale())
        });
        self.engine
            .top_up(
                id,
                // From the epoch: a log need not be in time order.
                &TopUp::new("tollgate-replay", amount, currency).effective_at(DateTime::UNIX_EPOCH),
            )
            .map(|_| ())
            .map_err(|e| format!("subject `{id}`: starting balance: {e}"))
    }

    /// Whether `meter` is not a money meter (an unknown one is left to the
    /// engine to refuse).
    #[inline]
    fn is_count(&self, meter: &str) -> bool {
        !self
            .currencies
            .iter()
            .any(|(m, c)| *m == meter && c.is_some())
    }

    /// `ev`'s amounts, money and all, added to `req`.
    fn request<'e>(&self, req: &mut Request<'e>, ev: &'e Event<'_>) -> Result<(), String>
    where
        'c: 'e,
    {
        for (meter, n) in ev.amounts.iter() {
            // Money for a money meter, in the meter's own currency.
            let currency = self
                .currencies
                .iter()
                .find(|(m, _)| m == meter)
                .and_then(|(_, c)| *c);
            // Added in place: the request is not moved per amount.
            match (currency, *n) {
                (Some(c), Num::Int(i)) => req.add_money(meter, Decimal::from(i), c),
                (Some(c), Num::Dec(d)) => req.add_money(meter, d, c),
                (None, Num::Int(i)) => req.add_units(meter, i),
                (None, Num::Dec(d)) => req.add_units(meter, whole(meter, d)?),
            };
        }
        Ok(())
    }

    /// A new subject's tally: every limit of its plan at a peak of 0, so a
    /// limit no request touched is reported too.
    fn unused_limits(&self, id: &str, plan: &str) -> Tally {
        let mut tally = Tally::default();
        let Some(plan) = self.catalog.plan(plan) else {
            return tally;
        };
        let scope = ScopeKey::subject(id);
        for l in plan.limits() {
            let meter = self.catalog.meter(l.meter());
            tally.peaks.push(Peak {
                scope: scope.clone(),
                meter: Name::new(l.meter()),
                window: l.window(),
                max: l.max(),
                peak: 0,
                scale: meter.and_then(|m| m.currency().map(|_| m.scale())),
            });
        }
        tally
    }

    /// Replay one event.
    #[inline]
    fn event(&mut self, ev: &Event<'_>) -> Result<(), String> {
        let at = DateTime::from_timestamp_millis(ev.ts)
            .ok_or_else(|| format!("timestamp {} out of range", ev.ts))?;
        let i = self.subject(&ev.subject)?;
        self.clock.set(at);
        // Built in this frame and filled in place: not returned from a
        // helper and moved into it.
        let mut req = Request::new(&ev.subject);
        match ev.amounts.small_ints() {
            Some(a) if a.iter().all(|(m, _)| self.is_count(m)) => counts(&mut req, a),
            _ => self.request(&mut req, ev)?,
        }
        if let Some(m) = &ev.model {
            req = req.model(m);
        }
        if let Some(e) = &ev.event {
            req = req.event(e);
        }
        let d = self.engine.admit(&req).map_err(|e| e.to_string())?;
        let duplicate = ev
            .event
            .as_ref()
            .is_some_and(|e| !self.events.insert((i, (**e).into())));
        self.out.subjects[i].tally.count(&d, duplicate);
        self.out.span = Some(match self.out.span {
            Some((a, b)) => (a.min(ev.ts), b.max(ev.ts)),
            None => (ev.ts, ev.ts),
        });
        if self.chart {
            self.plot(ev.ts, &d);
        }
        Ok(())
    }

    fn plot(&mut self, ts: i64, d: &Decision) {
        for l in d.limits.as_slice() {
            let key = (l.scope.to_string(), format!("{} ({})", l.meter, l.window));
            let n = self.out.series.len();
            let i = *self.series.entry(key.clone()).or_insert(n);
            if i == n {
                self.out
                    .series
                    .push(Series::new(format!("{} {}", key.0, key.1), l.money_scale()));
            }
            self.out.series[i].push(ts, l.used.saturating_add(l.held), l.max);
        }
    }
}

/// Whole amounts of count meters, added to `req`.
#[inline(always)]
fn counts<'e>(req: &mut Request<'e>, a: &'e [(Cow<'_, str>, Num)]) {
    for (meter, n) in a {
        // In place (`add_units`): no copy of the request per amount.
        req.add_units(
            meter,
            match n {
                Num::Int(n) => *n,
                Num::Dec(_) => 0,
            },
        );
    }
}

/// A count meter's whole units from a decimal amount.
fn whole(meter: &str, d: Decimal) -> Result<u64, String> {
    u64::try_from(d)
        .ok()
        .filter(|w| Decimal::from(*w) == d)
        .ok_or_else(|| format!("meter `{meter}` counts whole units, not {d}"))
}

/// Replay the log at `opts.log` against `catalog`.
///
/// # Errors
/// The log cannot be opened or read, or a CSV header is bad.
pub fn run(catalog: &Catalog, opts: &Options) -> Result<Outcome, String> {
    let path: &Path = &opts.log;
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let bar = progress(opts.progress, size);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut r = Replayer::new(catalog, opts);
    let mut buf = Vec::with_capacity(256);
    let mut header: Option<CsvHeader> = None;
    let (mut line_no, mut read) = (0u64, 0u64);
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("{}: line {}: {e}", path.display(), line_no + 1))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        read += n as u64;
        if line_no % 65_536 == 0 {
            if let Some(b) = &bar {
                b.set_position(read);
            }
        }
        let line = trim_end(&buf);
        if line.is_empty() || line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = if csv {
            match std::str::from_utf8(line) {
                Err(e) => Err(format!("not UTF-8: {e}")),
                Ok(text) => match &header {
                    None => {
                        header = Some(
                            CsvHeader::parse(text)
                                .map_err(|e| format!("{}: line {line_no}: {e}", path.display()))?,
                        );
                        continue;
                    }
                    Some(h) => h.line(text).and_then(|ev| r.event(&ev)),
                },
            }
        } else {
            log::json_line(line, |ev| r.event(ev))
        };
        r.out.lines += 1;
        if let Err(reason) = result {
            r.out.bad.push(BadLine {
                line: line_no,
                reason,
            });
            if opts.strict {
                r.out.stopped = true;
                break;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(r.out)
}

fn trim_end(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

/// A progress bar over the file's bytes, for a log of 64 MiB or more on a
/// terminal.
fn progress(wanted: bool, size: u64) -> Option<ProgressBar> {
    if !wanted || size < 64 << 20 || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(size);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    Some(bar)
}
