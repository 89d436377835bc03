//! `AsyncAllowanceStore` for `RedisStore`: a batch as one script call.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::store::{
    Applied, AsyncAllowanceStore, BalanceAction, Batch, FailurePolicy, LeaseAction, LeaseId,
    LeaseInfo, LeaseOp, Mode, ScopeKey, ScopeKind,
};
use crate::Error;

use super::encode::*;
use super::RedisStore;

#[async_trait]
impl AsyncAllowanceStore for RedisStore {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        crate::store::validate::validate(batch)?;
        check_lease_scopes(batch)?;
        let digests = Digests::of(self, batch);
        let extra = self.lease_slots(batch, &digests).await?;
        let r = if !extra.is_empty() || !digests.one_slot(self) {
            self.apply_spanning(batch, &digests, &extra).await
        } else {
            self.apply_one(batch, &digests, false).await
        };
        self.settled_event(batch, r).await
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        let (now, server) = self.now_arg(now.timestamp_millis());
        let mut rows: Vec<String> = Vec::new();
        for od in self.overdue_indexes().await? {
            let Some(tag) = od.strip_suffix(":od") else {
                continue;
            };
            let mut inv = self.overdue.prepare_invoke();
            inv.key(od.as_str())
                .arg(now.as_str())
                .arg(server)
                .arg(format!("{tag}:l:"));
            let part: Vec<String> = self.run(&inv).await.map_err(known)?;
            rows.extend(part);
        }
        let mut out = Vec::with_capacity(rows.len() / 5);
        for row in rows.chunks_exact(5) {
            let id: LeaseId = row[0].parse().map_err(|_| bad_reply("lease id"))?;
            // The owner's digest, as `digest_of` writes it.
            if row[1].len() != 32 || !row[1].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad_reply("owner"));
            }
            let owner = format!("hmac:{}", row[1]);
            let ms = |s: &str| s.parse::<i64>().map(ms_to_time).ok();
            out.push(LeaseInfo::new(
                id,
                ScopeKey::subject(owner),
                ms(&row[2]).ok_or_else(|| bad_reply("opened"))?,
                ms(&row[3]).ok_or_else(|| bad_reply("expiry"))?,
                ms(&row[4]),
            ));
        }
        out.sort_by_key(|l| (l.deadline, l.id));
        Ok(out)
    }

    fn failure_policy(&self) -> FailurePolicy {
        self.policy
    }

    /// A call that times out may have applied: `true` unless turned off
    /// with [`RedisConfig::engine_event_ids`](super::RedisConfig::engine_event_ids).
    fn needs_event_ids(&self) -> bool {
        self.made_ids
    }

    fn history_periods(&self) -> u32 {
        self.history_depth()
    }

    async fn period_usage(
        &self,
        ops: &[crate::store::PeriodOp<'_>],
        _now_ms: i64,
    ) -> Result<Vec<u64>, Error> {
        self.read_periods(ops).await
    }
}

/// A lease holds counters of its owner and of pools only.
fn check_lease_scopes(batch: &Batch<'_>) -> Result<(), Error> {
    let Some(l) = batch.lease else {
        return Ok(());
    };
    if !matches!(l.action, LeaseAction::Open { .. } | LeaseAction::Grow) {
        return Ok(());
    }
    match batch
        .ops
        .iter()
        .find(|o| o.delta > 0 && o.scope.kind() == ScopeKind::Subject && o.scope != l.owner)
    {
        Some(op) => Err(Error::InvalidBatch {
            reason: format!(
                "RedisStore: a lease holds counters of its owner and of pools, not of {}",
                op.scope
            ),
        }),
        None => Ok(()),
    }
}

/// The script's lease arguments (`-` where a batch has no lease).
struct LeaseArgs {
    action: &'static str,
    lkey: String,
    lid: String,
    owner_sid: String,
    owner_desc: String,
    p1: String,
    p2: String,
}

impl LeaseArgs {
    fn none() -> Self {
        Self {
            action: "-",
            lkey: "-".to_owned(),
            lid: "-".to_owned(),
            owner_sid: "-".to_owned(),
            owner_desc: "-".to_owned(),
            p1: "-".to_owned(),
            p2: "-".to_owned(),
        }
    }
}

impl RedisStore {
    fn lease_args(&self, l: &LeaseOp<'_>, home: &str) -> LeaseArgs {
        let lid = l.id.to_string();
        let mut args = LeaseArgs {
            lkey: self.layout.lease(home, &lid),
            lid,
            owner_sid: self.scope_hash(l.owner),
            // `overdue` answers the owner's digest, never its id.
            owner_desc: self.scope_hash(l.owner),
            ..LeaseArgs::none()
        };
        match l.action {
            LeaseAction::Open {
                expires_at_ms,
                deadline_ms,
            } => {
                args.action = "o";
                args.p1 = expires_at_ms.to_string();
                args.p2 = deadline_ms.map_or("-".into(), |d| d.to_string());
            }
            LeaseAction::Renew { expires_at_ms } => {
                args.action = "r";
                args.p1 = expires_at_ms.to_string();
            }
            LeaseAction::Grow => args.action = "g",
            LeaseAction::Settle { keep } => {
                args.action = "s";
                args.p1 = keep.num().to_string();
                args.p2 = keep.den().to_string();
            }
        }
        args
    }
}

/// The keyed digest of every scope a batch names, and its home: the scope
/// whose slot holds the batch's lease record, event and deadline index
/// (the lease's owner, else the first op's scope, else the first
/// cooldown's, else the balance's).
pub(super) struct Digests {
    pub(super) ops: Vec<String>,
    pub(super) cools: Vec<String>,
    pub(super) owner: Option<String>,
    /// The scope of the batch's balance, if it names one.
    pub(super) bal: Option<String>,
    pub(super) home: String,
}

impl Digests {
    pub(super) fn of(store: &RedisStore, batch: &Batch<'_>) -> Self {
        let mut ops: Vec<String> = Vec::with_capacity(batch.ops.len());
        for (i, op) in batch.ops.iter().enumerate() {
            // Ops of one scope (the usual batch) hash its id once.
            match i.checked_sub(1).map(|j| (batch.ops[j].scope, j)) {
                Some((prev, j)) if prev == op.scope => {
                    let d = ops[j].clone();
                    ops.push(d);
                }
                _ => ops.push(store.scope_hash(op.scope)),
            }
        }
        let cools: Vec<String> = batch
            .cooldowns
            .iter()
            .map(|c| store.scope_hash(c.scope))
            .collect();
        let owner = batch.lease.map(|l| store.scope_hash(l.owner));
        let bal = batch.balance.map(|b| {
            match ops
                .iter()
                .zip(batch.ops)
                .find(|(_, op)| op.scope == b.scope)
            {
                Some((d, _)) => d.clone(),
                None => store.scope_hash(b.scope),
            }
        });
        let home = owner
            .clone()
            .or_else(|| ops.first().cloned())
            .or_else(|| cools.first().cloned())
            .or_else(|| bal.clone())
            .unwrap_or_default();
        Self {
            ops,
            cools,
            owner,
            bal,
            home,
        }
    }

    /// Whether every key of the batch is in one slot (always, on one node).
    pub(super) fn one_slot(&self, store: &RedisStore) -> bool {
        if !store.layout.cluster {
            return true;
        }
        let home = store.layout.slot(&self.home);
        self.ops
            .iter()
            .chain(&self.cools)
            .chain(&self.bal)
            .all(|d| store.layout.slot(d) == home)
    }
}

impl RedisStore {
    /// One batch whose keys share a slot, as one script call. With
    /// `ledger_read_only`, the event ledger is consulted but not written
    /// (the first phase of a decision spanning slots).
    pub(super) async fn apply_one(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        ledger_read_only: bool,
    ) -> Result<Applied, Error> {
        let grant = match batch.balance.map(|b| b.action) {
            Some(BalanceAction::Grant(g)) => Some(g),
            _ => None,
        };
        let mut ties = String::from("-");
        // A grant whose terms tie with grants the balance has is placed by
        // the ids' bytes, which only this side can read: the script names
        // the tied grants, and the call is made again with their order (a
        // few times at most, should grants keep arriving in between).
        for _ in 0..8 {
            let (reply, descs) = self
                .apply_call(batch, digests, ledger_read_only, &ties)
                .await?;
            match (tied_grants(&reply), grant) {
                (Some(tied), Some(g)) => {
                    let mut all: Vec<(String, String)> = Vec::with_capacity(tied.len() + 1);
                    for (dig, sealed) in tied {
                        let id = self
                            .keyed
                            .open_grant(&sealed)
                            .ok_or_else(|| bad_reply("a grant id not sealed under this secret"))?;
                        all.push((id, dig));
                    }
                    all.push((g.id.to_owned(), self.keyed.grant(g.id)));
                    all.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                    ties = all
                        .iter()
                        .map(|(_, d)| d.as_str())
                        .collect::<Vec<_>>()
                        .join(",");
                }
                (Some(_), None) => return Err(bad_reply("tie")),
                (None, _) => return self.decode(batch, &descs, &reply),
            }
        }
        Err(Error::Store {
            message: "redis: grants with the same terms kept arriving; try again".into(),
        })
    }

    /// One script call for [`RedisStore::apply_one`], with the order of
    /// tied grants (`ties`, `-` for none known); the reply and the hold
    /// descriptors.
    async fn apply_call(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
        ledger_read_only: bool,
        ties: &str,
    ) -> Result<(redis::Value, Vec<String>), Error> {
        let owner = batch.lease.map(|l| l.owner);
        let (now, server) = self.now_arg(batch.now_ms);
        let mode = match batch.mode {
            Mode::Check => "c",
            Mode::WithinLimits => "w",
            Mode::Force => "f",
        };
        let home = digests.home.as_str();
        let odkey = self.layout.overdue(home);
        // The key routes the call on a cluster: the home slot's.
        let mut inv = Self::fcall(odkey.as_str());
        let LeaseArgs {
            action,
            lkey,
            lid,
            owner_sid,
            owner_desc,
            p1,
            p2,
        } = batch
            .lease
            .map_or_else(LeaseArgs::none, |l| self.lease_args(&l, home));
        let (ekey, efp) = match batch.event {
            // The fingerprint mixes in the lease owner's id: it is kept
            // only under the key too.
            Some(e) => (
                format!(
                    "{}{}",
                    if ledger_read_only {
                        "?"
                    } else if e.engine_made() {
                        // Made for this call: nothing to consult.
                        "!"
                    } else {
                        ""
                    },
                    self.layout.event(home, &self.keyed.event(e.id))
                ),
                self.keyed.digest(
                    b"f:",
                    &crate::store::event_fingerprint(batch)
                        .unwrap_or(e.fingerprint)
                        .to_le_bytes(),
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        // An id the engine made for this call is kept only as long as a
        // retry needs it.
        let horizon = match batch.event {
            Some(e) if e.engine_made() => self.retry_horizon_ms,
            _ => self.horizon_ms,
        };
        inv.arg(now)
            .arg(server)
            .arg(mode)
            .arg(horizon)
            .arg(self.margin_ms)
            .arg(self.lifetime_ms)
            .arg(batch.ops.len())
            .arg(batch.cooldowns.len())
            .arg(action)
            .arg(ekey)
            .arg(self.history_depth());
        // What only an event or a lease needs is sent only with one (the
        // script reads the layout from `ekey` and `action`).
        if batch.event.is_some() {
            inv.arg(efp);
        }
        if batch.lease.is_some() {
            inv.arg(lkey)
                .arg(owner_sid)
                .arg(owner_desc)
                .arg(p1)
                .arg(p2)
                .arg(lid)
                .arg(odkey.as_str());
        }
        // Only a lease stores or reports hold descriptors.
        let descs: Vec<String> = match batch.lease {
            Some(_) => batch
                .ops
                .iter()
                .map(|op| self.hold_desc(op.scope, owner, &op.meter, op.window))
                .collect(),
            None => Vec::new(),
        };
        let mut last: Option<(&str, String)> = None;
        for (i, op) in batch.ops.iter().enumerate() {
            let d = digests.ops[i].as_str();
            if last.as_ref().is_none_or(|(prev, _)| *prev != d) {
                last = Some((d, self.layout.counters(d)));
            }
            if let Some((_, key)) = &last {
                inv.arg(key.as_str());
            }
            inv.arg(Self::counter_field(&op.meter, op.window));
            window_args(&mut inv, op.window);
            inv.arg(op.delta)
                .arg(op.max.map_or("-".into(), |m| m.to_string()));
            if let Some(desc) = descs.get(i) {
                inv.arg(desc.as_str());
            }
        }
        for (c, d) in batch.cooldowns.iter().zip(&digests.cools) {
            inv.arg(self.layout.cooldown(d))
                .arg(c.start_until_ms.map_or("-".into(), |t| t.to_string()));
        }
        // The balance (rule 10): named by the batch, or (`-`) the one its
        // lease holds on, which the script reads from the lease record.
        if batch.balance.is_some() || batch.lease.is_some() {
            match (batch.balance, &digests.bal) {
                (Some(b), Some(d)) => {
                    inv.arg(self.layout.balance(d, &b.meter));
                    match b.action {
                        BalanceAction::Debit { amount, overdraft } => {
                            inv.arg("d").arg(amount).arg(overdraft);
                        }
                        BalanceAction::Grant(g) => {
                            let sealed = self
                                .keyed
                                .seal_grant(g.id)
                                .ok_or_else(|| crate::store::validate::invalid("a grant id"))?;
                            inv.arg("g")
                                .arg(self.keyed.grant(g.id))
                                .arg(g.amount)
                                .arg(g.effective_at_ms)
                                .arg(g.expires_at_ms.map_or("-".into(), |e| e.to_string()))
                                .arg(g.priority)
                                .arg(sealed)
                                .arg(ties);
                        }
                    }
                }
                _ => {
                    inv.arg("-").arg("-");
                }
            }
        }
        let reply: redis::Value = self.call_apply(&inv).await.map_err(|e| match e {
            // A check changes nothing, whether it ran or not.
            e if batch.mode == Mode::Check => known(e),
            // The retry that settles it is the one with this event id.
            Error::StoreOutcomeUnknown { message, .. } => Error::StoreOutcomeUnknown {
                message,
                event: batch.event.map(|e| e.id.to_owned()),
            },
            e => e,
        })?;
        Ok((reply, descs))
    }
}

/// A reply naming the grants a new grant ties with (`TIE` and pairs of
/// digest and sealed id), if it is one.
fn tied_grants(reply: &redis::Value) -> Option<Vec<(String, String)>> {
    let redis::Value::BulkString(b) = reply else {
        return None;
    };
    let text = std::str::from_utf8(b).ok()?;
    let mut words = text.split_ascii_whitespace();
    if words.next() != Some("TIE") {
        return None;
    }
    let mut out = Vec::new();
    while let (Some(d), Some(s)) = (words.next(), words.next()) {
        out.push((d.to_owned(), s.to_owned()));
    }
    Some(out)
}

impl RedisStore {
    /// On a cluster an event is kept in its decision's home slot, the
    /// lease owner's for a settlement: another owner's settlement under
    /// the same id would find no lease there rather than the event. So a
    /// settlement with an event also leaves a marker in the event's own
    /// slot, `{prefix:e:<event digest>}` (best effort, after it applied),
    /// and a settlement answered "unknown reservation" reads it: an event
    /// id already settled with another fingerprint is
    /// [`Error::EventConflict`] (contract rule 8).
    async fn settled_event(
        &self,
        batch: &Batch<'_>,
        r: Result<Applied, Error>,
    ) -> Result<Applied, Error> {
        let (Some(event), Some(lease)) = (batch.event, batch.lease) else {
            return r;
        };
        if !self.layout.cluster || !matches!(lease.action, LeaseAction::Settle { .. }) {
            return r;
        }
        let fp = crate::store::event_fingerprint(batch)
            .unwrap_or(event.fingerprint)
            .to_string();
        let key = format!(
            "{{{}:e:{}}}",
            self.layout.prefix,
            self.keyed.event(event.id)
        );
        let fp = self.keyed.digest(b"f:", fp.as_bytes());
        let bounded = |cmd: redis::Cmd| async move {
            tokio::time::timeout(self.timeout, self.conn.query::<Option<String>>(&cmd))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
        };
        match r {
            Ok(a) if a.replayed_at_ms.is_none() => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key)
                    .arg(&fp)
                    .arg("PX")
                    .arg(self.horizon_ms + self.margin_ms);
                bounded(cmd).await;
                Ok(a)
            }
            Err(Error::UnknownReservation { id }) => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(&key);
                match bounded(cmd).await {
                    Some(kept) if kept != fp => Err(Error::EventConflict {
                        event: event.id.to_owned(),
                    }),
                    _ => Err(Error::UnknownReservation { id }),
                }
            }
            r => r,
        }
    }

    /// On a cluster, the other slots' scopes (by digest) a lease opened
    /// across slots also lives in, for a renew or a settlement (its
    /// owner's record lists them); none on one node.
    async fn lease_slots(
        &self,
        batch: &Batch<'_>,
        digests: &Digests,
    ) -> Result<Vec<String>, Error> {
        let Some(lease) = batch.lease else {
            return Ok(Vec::new());
        };
        if !self.layout.cluster
            || !matches!(
                lease.action,
                LeaseAction::Renew { .. } | LeaseAction::Settle { .. }
            )
        {
            return Ok(Vec::new());
        }
        let key = self.layout.lease(&digests.home, &lease.id.to_string());
        let sp: Option<String> = tokio::time::timeout(
            self.timeout,
            self.conn.query(redis::cmd("HGET").arg(key).arg("sp")),
        )
        .await
        .map_err(|_| timed_out(self.timeout))?
        .map_err(store_error)?;
        Ok(sp
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect())
    }

    /// The deadline indexes to read: one on one node; on a cluster, every
    /// `{prefix:<owner>}:od` on every primary (found with `SCAN`, so
    /// `overdue` costs a pass over the keys: a maintenance call).
    async fn overdue_indexes(&self) -> Result<Vec<String>, Error> {
        if !self.layout.cluster {
            return Ok(vec![self.layout.overdue("")]);
        }
        #[cfg(feature = "redis-cluster")]
        {
            let mut pattern = String::from("{");
            for ch in self.layout.prefix.chars() {
                if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                    pattern.push('\\');
                }
                pattern.push(ch);
            }
            pattern.push_str(":*}:od");
            let mut found = Vec::new();
            for (host, port) in bounded(self.timeout, self.conn.primaries()).await? {
                let mut cursor = 0u64;
                loop {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("TYPE")
                        .arg("zset");
                    let value = bounded(self.timeout, self.conn.on_node(&host, port, cmd)).await?;
                    let (next, keys): (u64, Vec<String>) =
                        redis::FromRedisValue::from_redis_value(value)
                            .map_err(|_| bad_reply("scan"))?;
                    found.extend(keys);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            found.sort();
            found.dedup();
            Ok(found)
        }
        #[cfg(not(feature = "redis-cluster"))]
        Ok(Vec::new())
    }
}

/// A read bounded by the timeout: nothing it does changes anything.
#[cfg(feature = "redis-cluster")]
async fn bounded<T>(
    timeout: std::time::Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| timed_out(timeout))?
        .map_err(store_error)
}
