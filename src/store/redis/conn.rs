//! The connection (one node, or a Redis Cluster with feature
//! `redis-cluster`) and the key layout that goes with it.

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, RedisResult};

/// A connection to one Redis, or to a cluster.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    /// The one node's connection; `None` on a cluster.
    pub(super) fn single(&self) -> Option<&ConnectionManager> {
        match self {
            Conn::Single(c) => Some(c),
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(_) => None,
        }
    }

    /// Run a script invocation (routed by its first key on a cluster).
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    /// Run a command (routed by its key on a cluster).
    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            #[cfg(feature = "redis-cluster")]
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// Every primary's `host:port` (one node: none, its commands need no
    /// address).
    #[cfg(feature = "redis-cluster")]
    pub(super) async fn primaries(&self) -> RedisResult<Vec<(String, u16)>> {
        let Conn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c.clone())
            .await?;
        Ok(parse_primaries(&nodes))
    }

    /// Run `cmd` on the primary at `host:port`.
    #[cfg(feature = "redis-cluster")]
    pub(super) async fn on_node(
        &self,
        host: &str,
        port: u16,
        cmd: redis::Cmd,
    ) -> RedisResult<redis::Value> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                c.clone().route_command(cmd, route).await
            }
        }
    }
}

/// The primaries in a `CLUSTER NODES` answer: lines whose flags say
/// `master` and that serve slots.
#[cfg(feature = "redis-cluster")]
fn parse_primaries(nodes: &str) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 9 || !f[2].split(',').any(|x| x == "master") || f[2].contains("fail") {
            continue;
        }
        // `ip:port@cport[,hostname]`
        let addr = f[1].split(['@', ',']).next().unwrap_or_default();
        if let Some((host, port)) = addr.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                out.push((host.to_owned(), port));
            }
        }
    }
    out
}

/// Where a store's keys go: all under one hash tag `{prefix}` on one node;
/// on a cluster, under one tag per scope, `{prefix:<scope digest>}`, so
/// scopes spread over the slots while every key of a scope (its counters,
/// holds, cooldown, the leases it owns, the events of its decisions) shares
/// one slot.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) prefix: String,
    pub(super) cluster: bool,
}

impl Layout {
    /// The hash tag of a scope's keys (by digest), braces included.
    pub(super) fn tag(&self, digest: &str) -> String {
        if self.cluster {
            format!("{{{}:{digest}}}", self.prefix)
        } else {
            format!("{{{}}}", self.prefix)
        }
    }

    /// The slot of a scope's keys (0 on one node).
    pub(super) fn slot(&self, digest: &str) -> u16 {
        if self.cluster {
            slot_of(format!("{}:{digest}", self.prefix).as_bytes())
        } else {
            0
        }
    }

    fn key(&self, digest: &str, kind: &str, rest: &str) -> String {
        if self.cluster {
            format!("{{{}:{digest}}}:{kind}{rest}", self.prefix)
        } else {
            format!("{{{}}}:{kind}:{digest}{rest}", self.prefix)
        }
    }

    /// A scope's counters (a hash; its hold-expiry set is this plus `:x`).
    pub(super) fn counters(&self, digest: &str) -> String {
        self.key(digest, "c", "")
    }

    /// A scope's cooldown end.
    pub(super) fn cooldown(&self, digest: &str) -> String {
        self.key(digest, "k", "")
    }

    /// A scope's prepaid balance in one money meter (a hash), in the
    /// scope's slot; the meter length-prefixed, as in a counter field.
    pub(super) fn balance(&self, digest: &str, meter: &str) -> String {
        self.key(digest, "b", &format!(":{}:{meter}", meter.len()))
    }

    /// A lease record, in its owner's slot.
    pub(super) fn lease(&self, owner: &str, id: &str) -> String {
        format!("{}:l:{id}", self.tag(owner))
    }

    /// The deadline index of the leases `home` owns (one node: of all).
    pub(super) fn overdue(&self, home: &str) -> String {
        format!("{}:od", self.tag(home))
    }

    /// An applied event, in the slot of the decision's home scope.
    pub(super) fn event(&self, home: &str, event: &str) -> String {
        format!("{}:e:{event}", self.tag(home))
    }
}

/// Redis Cluster's slot of a hash tag's content: CRC16 (XMODEM) mod 16384.
pub(super) fn slot_of(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // `CLUSTER KEYSLOT foo` = 12182, `CLUSTER KEYSLOT 123456789` = 12739.
        assert_eq!(slot_of(b"foo"), 12_182);
        assert_eq!(slot_of(b"123456789"), 12_739);
    }

    #[test]
    fn a_cluster_layout_tags_each_scope() {
        let one = Layout {
            prefix: "q".into(),
            cluster: false,
        };
        let many = Layout {
            prefix: "q".into(),
            cluster: true,
        };
        assert_eq!(one.counters("ab"), "{q}:c:ab");
        assert_eq!(many.counters("ab"), "{q:ab}:c");
        assert_eq!(many.lease("ab", "7"), "{q:ab}:l:7");
        assert_eq!(one.lease("ab", "7"), "{q}:l:7");
        assert_eq!(one.slot("ab"), one.slot("cd"));
        assert_eq!(many.slot("ab"), slot_of(b"q:ab"));
    }

    #[cfg(feature = "redis-cluster")]
    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7004@17004 slave b2 0 0 2 connected
d4 127.0.0.1:7003@17003 master,fail - 0 0 3 connected
";
        assert_eq!(
            parse_primaries(nodes),
            [
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002)
            ]
        );
    }
}
