//! Closed calendar periods on Redis (contract rule 11): the read. The
//! write is in the function library (`apply.lua`, `keepclosed`): a batch
//! that rolls a calendar counter keeps its period's total in the scope's
//! hash, field `<counter>|p`.

use super::encode::known;
use super::{apply_library, RedisStore};
use crate::store::PeriodOp;
use crate::Error;

impl RedisStore {
    /// A new `FCALL` of the library's read of closed periods (rule 11) on
    /// the scope hash `key`; (field, start) pairs follow. (`FCALL`, not
    /// `FCALL_RO`: routed as every other call; the function writes nothing.)
    pub(super) fn fcall_periods(key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        let name = apply_library()
            .1
            .replacen("tollgate_apply_", "tollgate_periods_", 1);
        cmd.arg(name).arg(1).arg(key);
        cmd
    }

    /// How many closed periods per counter the store keeps.
    pub(super) fn history_depth(&self) -> u32 {
        self.history
    }

    /// The usage each op's counter counted in its period (rule 11): one
    /// call per scope hash.
    pub(super) async fn read_periods(&self, ops: &[PeriodOp<'_>]) -> Result<Vec<u64>, Error> {
        crate::store::validate_period_ops(ops)?;
        let mut out = vec![0u64; ops.len()];
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let key = self.layout.counters(&self.scope_hash(op.scope));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (key, list) in groups {
            let mut cmd = Self::fcall_periods(&key);
            for &i in &list {
                cmd.arg(Self::counter_field(&ops[i].meter, ops[i].window))
                    .arg(ops[i].start_ms);
            }
            let reply: Vec<String> = self.call_apply(&cmd).await.map_err(known)?;
            if reply.len() != list.len() {
                return Err(Error::Store {
                    message: format!(
                        "redis: {} period totals for {} periods",
                        reply.len(),
                        list.len()
                    ),
                });
            }
            for (&i, v) in list.iter().zip(&reply) {
                out[i] = v.parse().map_err(|_| Error::Store {
                    message: format!("redis: period total `{v}` is not a count"),
                })?;
            }
        }
        Ok(out)
    }
}
