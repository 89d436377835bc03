//! `AsyncAllowanceStore` for `RedisStore`: a batch as one script call.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::store::{
    Applied, AsyncAllowanceStore, Batch, FailurePolicy, LeaseAction, LeaseId, LeaseInfo, LeaseOp,
    Mode, ScopeKey, ScopeKind,
};
use crate::Error;

use super::encode::*;
use super::RedisStore;

#[async_trait]
impl AsyncAllowanceStore for RedisStore {
    async fn apply(&self, batch: &Batch<'_>) -> Result<Applied, Error> {
        crate::store::validate::validate(batch)?;
        let owner = batch.lease.map(|l| l.owner);
        check_lease_scopes(batch)?;
        let (now, server) = self.now_arg(batch.now_ms);
        let mode = match batch.mode {
            Mode::Check => "c",
            Mode::WithinLimits => "w",
            Mode::Force => "f",
        };
        let mut inv = self.apply.prepare_invoke();
        inv.key(format!("{}:od", self.tag));
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
            .map_or_else(LeaseArgs::none, |l| self.lease_args(&l));
        let (ekey, efp) = match batch.event {
            // The fingerprint mixes in the lease owner's id: it is kept
            // only under the key too.
            Some(e) => (
                format!("{}:e:{}", self.tag, self.keyed.event(e.id)),
                self.keyed.digest(
                    b"f:",
                    &crate::store::event_fingerprint(batch)
                        .unwrap_or(e.fingerprint)
                        .to_le_bytes(),
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        inv.arg(now)
            .arg(server)
            .arg(mode)
            .arg(self.horizon_ms)
            .arg(self.margin_ms)
            .arg(self.lifetime_ms)
            .arg(batch.ops.len())
            .arg(batch.cooldowns.len())
            .arg(action)
            .arg(ekey);
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
                .arg(format!("{}:od", self.tag));
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
        let mut last: Option<(&ScopeKey, String)> = None;
        for (i, op) in batch.ops.iter().enumerate() {
            // Ops of one scope (the usual batch) hash its id once.
            if last.as_ref().is_none_or(|(scope, _)| *scope != op.scope) {
                last = Some((op.scope, self.scope_key(op.scope)));
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
        for c in batch.cooldowns {
            inv.arg(format!("{}:k:{}", self.tag, self.scope_hash(c.scope)))
                .arg(c.start_until_ms.map_or("-".into(), |t| t.to_string()));
        }
        let reply: redis::Value = self.run(&inv).await.map_err(|e| match e {
            // A check changes nothing, whether it ran or not.
            e if batch.mode == Mode::Check => known(e),
            // The retry that settles it is the one with this event id.
            Error::StoreOutcomeUnknown { message, .. } => Error::StoreOutcomeUnknown {
                message,
                event: batch.event.map(|e| e.id.to_owned()),
            },
            e => e,
        })?;
        self.decode(batch, &descs, &reply)
    }

    async fn overdue(&self, now: DateTime<Utc>) -> Result<Vec<LeaseInfo>, Error> {
        let (now, server) = self.now_arg(now.timestamp_millis());
        let mut inv = self.overdue.prepare_invoke();
        inv.key(format!("{}:od", self.tag))
            .arg(now)
            .arg(server)
            .arg(format!("{}:l:", self.tag));
        let rows: Vec<String> = self.run(&inv).await.map_err(known)?;
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

    /// `true`: a call that times out may have applied.
    fn needs_event_ids(&self) -> bool {
        true
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
    fn lease_args(&self, l: &LeaseOp<'_>) -> LeaseArgs {
        let lid = l.id.to_string();
        let mut args = LeaseArgs {
            lkey: format!("{}:l:{lid}", self.tag),
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
