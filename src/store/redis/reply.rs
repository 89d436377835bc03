//! Reading the script's reply into an `Applied`.

use crate::name::Name;
use crate::store::{
    Applied, BalanceState, Batch, CounterOp, CounterState, GrantState, InlineVec, ScopeKey,
    SettledHold,
};
use crate::window::Window;
use crate::Error;

use super::encode::*;
use super::RedisStore;

/// One word of a script reply: the script answers an array whose numbers
/// below 2^53 are integer replies and whose other words are strings (a
/// string may hold several words); errors and replays are one string.
#[derive(Clone, Copy)]
pub(super) enum Word<'a> {
    Str(&'a str),
    Int(i64),
}

pub(super) struct Reply<'a>(std::vec::IntoIter<Word<'a>>);

impl<'a> Reply<'a> {
    fn new(value: &'a redis::Value) -> Result<Self, Error> {
        fn text(b: &[u8]) -> Result<&str, Error> {
            std::str::from_utf8(b).map_err(|_| bad_reply("not UTF-8"))
        }
        let mut words = Vec::new();
        match value {
            redis::Value::BulkString(b) => {
                words.extend(text(b)?.split_ascii_whitespace().map(Word::Str));
            }
            redis::Value::Array(items) => {
                words.reserve(items.len());
                for item in items {
                    match item {
                        redis::Value::Int(n) => words.push(Word::Int(*n)),
                        redis::Value::BulkString(b) => {
                            words.extend(text(b)?.split_ascii_whitespace().map(Word::Str));
                        }
                        _ => return Err(bad_reply("element")),
                    }
                }
            }
            _ => return Err(bad_reply("type")),
        }
        Ok(Self(words.into_iter()))
    }
    fn done(&self) -> bool {
        self.0.as_slice().is_empty()
    }
    fn word(&mut self) -> Result<Word<'a>, Error> {
        self.0.next().ok_or_else(|| bad_reply("too short"))
    }
    fn token(&mut self) -> Result<&'a str, Error> {
        match self.word()? {
            Word::Str(s) => Ok(s),
            Word::Int(_) => Err(bad_reply("a number for a word")),
        }
    }
    fn int<T: std::str::FromStr + TryFrom<i64>>(&mut self) -> Result<T, Error> {
        match self.word()? {
            Word::Int(n) => T::try_from(n).map_err(|_| bad_reply("out of range")),
            Word::Str(s) => s.parse().map_err(|_| bad_reply("not a number")),
        }
    }
    /// An instant in Unix milliseconds, or `-` for none.
    fn time(&mut self) -> Result<Option<i64>, Error> {
        match self.word()? {
            Word::Str("-") => Ok(None),
            Word::Int(ms) => Ok(Some(ms)),
            Word::Str(t) => t
                .parse::<i64>()
                .map(Some)
                .map_err(|_| bad_reply("not a time")),
        }
    }
}

impl RedisStore {
    pub(super) fn decode(
        &self,
        batch: &Batch<'_>,
        descs: &[String],
        reply: &redis::Value,
    ) -> Result<Applied, Error> {
        let mut r = Reply::new(reply)?;
        let mut replayed_at = None;
        match r.token()? {
            "OK" => {}
            "RE" => {
                replayed_at = r.time()?;
                if r.token()? != "OK" {
                    return Err(bad_reply("replay"));
                }
            }
            "ERR" => return Err(self.error(batch, descs, &mut r)),
            _ => return Err(bad_reply("status")),
        }
        let applied = r.int::<u8>()? == 1;
        let _now: i64 = r.int()?;
        let nops: usize = r.int()?;
        // A replay answers the first batch, whose ops the fingerprint
        // vouches for; the reply describes itself either way.
        let mut counters = InlineVec::new();
        for _ in 0..nops {
            counters.push(CounterState {
                used: r.int()?,
                held: r.int()?,
                period_start_ms: r.time()?,
                resets_at_ms: r.time()?,
                available_at_ms: r.time()?,
            });
        }
        let ncool: usize = r.int()?;
        let mut cooldowns = InlineVec::new();
        for _ in 0..ncool {
            cooldowns.push(r.time()?);
        }
        let nset: usize = r.int()?;
        let mut settled = Vec::with_capacity(nset);
        for _ in 0..nset {
            let desc = r.token()?;
            let held: u64 = r.int()?;
            let charged: u64 = r.int()?;
            let (scope, meter, window) = self.resolve(batch, descs, desc)?;
            settled.push(SettledHold::new(scope, meter, window, held, charged));
        }
        let mut balance = None;
        if !r.done() {
            if r.token()? != "B" {
                return Err(bad_reply("balance"));
            }
            let (b, replayed) = self.balance(&mut r)?;
            balance = Some(Box::new(b));
            if replayed.is_some() {
                replayed_at = replayed;
            }
        }
        Ok(Applied {
            applied,
            counters,
            settled,
            cooldowns,
            replayed_at_ms: replayed_at,
            balance,
        })
    }

    /// A balance's part of a reply (after its `B`), and when a replayed
    /// grant was first made.
    fn balance(&self, r: &mut Reply<'_>) -> Result<(BalanceState, Option<i64>), Error> {
        let mut b = BalanceState {
            remaining: r.int()?,
            held: r.int()?,
            debt: r.int()?,
            fits: r.int::<u8>()? == 1,
            uncovered: r.int()?,
            grants: Vec::new(),
        };
        let n: usize = r.int()?;
        b.grants.reserve(n.min(1024));
        for _ in 0..n {
            let sealed = r.token()?;
            let id = self
                .keyed
                .open_grant(sealed)
                .ok_or_else(|| bad_reply("a grant id not sealed under this secret"))?;
            b.grants.push(GrantState {
                id,
                amount: r.int()?,
                spent: r.int()?,
                effective_at_ms: r.int()?,
                expires_at_ms: r.time()?,
                priority: r.int()?,
                granted_at_ms: r.int()?,
            });
        }
        let replayed = r.time()?;
        Ok((b, replayed))
    }

    /// The counter a hold descriptor names: an op of the batch, or what the
    /// descriptor itself says.
    fn resolve(
        &self,
        batch: &Batch<'_>,
        descs: &[String],
        desc: &str,
    ) -> Result<(ScopeKey, Name, Window), Error> {
        if let Some(op) = descs.iter().position(|d| d == desc).map(|i| batch.ops[i]) {
            return Ok((op.scope.clone(), op.meter, op.window));
        }
        let text = unhex(desc).ok_or_else(|| bad_reply("hold"))?;
        let mut parts = text.splitn(3, '\n');
        let (who, meter, window) = (
            parts.next().unwrap_or_default(),
            parts.next().ok_or_else(|| bad_reply("hold meter"))?,
            parts
                .next()
                .and_then(parse_window_key)
                .ok_or_else(|| bad_reply("hold window"))?,
        );
        let scope = match who.split_at_checked(1) {
            Some(("o", _)) => batch
                .lease
                .map(|l| l.owner.clone())
                .ok_or_else(|| bad_reply("hold owner"))?,
            Some(("P", h)) => ScopeKey::pool(format!("hmac:{h}")),
            Some(("s", h)) => ScopeKey::subject(format!("hmac:{h}")),
            _ => return Err(bad_reply("hold scope")),
        };
        // A meter the store wrote from a batch's op: a catalog's name.
        Ok((scope, Name::new(meter), window))
    }

    fn error(&self, batch: &Batch<'_>, descs: &[String], r: &mut Reply<'_>) -> Error {
        let id = || batch.lease.map(|l| l.id.to_string()).unwrap_or_default();
        match r.token() {
            Ok("conflict") => Error::EventConflict {
                event: batch.event.map(|e| e.id.to_owned()).unwrap_or_default(),
            },
            Ok("open") => Error::InvalidBatch {
                reason: format!("lease {} is already open", id()),
            },
            Ok("unknown") => Error::UnknownReservation { id: id() },
            Ok("grant") => Error::GrantConflict {
                payment: match batch.balance.map(|b| b.action) {
                    Some(crate::store::BalanceAction::Grant(g)) => g.id.to_owned(),
                    _ => String::new(),
                },
            },
            Ok("balance") => Error::InvalidBatch {
                reason: "a lease holds on one balance: the batch names another".into(),
            },
            Ok("settled") => Error::ReservationSettled { id: id() },
            Ok("expired") => Error::ReservationExpired { id: id() },
            Ok("overflow") => {
                let meter = match r.token() {
                    Ok("balance") => batch.balance.map(|b| b.meter.as_str().to_owned()),
                    Ok("hold") => r
                        .token()
                        .ok()
                        .and_then(|d| self.resolve(batch, descs, d).ok())
                        .map(|(_, m, _)| m.as_str().to_owned()),
                    Ok(i) => i
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| batch.ops.get(i.checked_sub(1)?))
                        .map(|op: &CounterOp<'_>| op.meter.as_str().to_owned()),
                    Err(_) => None,
                };
                Error::Overflow {
                    meter: meter.unwrap_or_default(),
                }
            }
            _ => bad_reply("error"),
        }
    }
}
