//! Prepaid balances through the async engine on a shared store: replicas
//! (each an engine with its own connection) top up and spend one balance.
//! The store's test file passes `connect`, which opens a new connection to
//! one fresh store (same schema or prefix each call).

use std::future::Future;

use rust_decimal::Decimal;
use tollgate::store::AsyncAllowanceStore;
use tollgate::{Allocation, Catalog, Engine, Error, Refusal, Request, SystemClock, TopUp};

/// One plan, `payg`: tokens at $0.01 from a prepaid balance.
pub fn catalog() -> Catalog {
    serde_json::from_str(
        r#"{
          "meters": [
            {"id": "tokens", "unit": "count"},
            {"id": "cost", "unit": {"money": {"currency": "USD", "scale": 2}}}
          ],
          "plans": [{
            "id": "payg", "cost_meter": "cost", "balance": {},
            "prices": {"tokens": "0.01"},
            "limits": [{"meter": "tokens", "window": "lifetime", "max": -1}]
          }]
        }"#,
    )
    .expect("catalog")
}

fn usd(cents: i64) -> Decimal {
    Decimal::new(cents, 2)
}

/// Eight replicas spend one $1.00 balance a cent at a time, 160 asks:
/// exactly 100 admitted, the rest refused for the balance; a top-up made
/// through one replica is credited once through any, a conflicting one
/// changes nothing, and a later top-up lets exactly its worth through.
pub async fn replicas_spend_one_balance<S, F, Fut>(connect: F)
where
    S: AsyncAllowanceStore + Send + Sync + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let mut engines = Vec::new();
    for _ in 0..8 {
        let engine = Engine::with_store_and_clock(catalog(), connect().await, SystemClock);
        engine
            .allocate(Allocation::new("acct", "payg"))
            .expect("allocate");
        engines.push(std::sync::Arc::new(engine));
    }
    let pack = TopUp::new("pay-1", usd(100), "USD");
    assert!(
        engines[0]
            .top_up_async("acct", &pack)
            .await
            .expect("top up")
            .new
    );
    let again = engines[5]
        .top_up_async("acct", &pack)
        .await
        .expect("redelivered");
    assert!(
        !again.new,
        "a redelivered payment credits once, on any replica"
    );
    assert_eq!(again.balance.available, usd(100));
    let conflict = engines[3]
        .top_up_async("acct", &TopUp::new("pay-1", usd(200), "USD"))
        .await;
    assert!(
        matches!(conflict, Err(Error::GrantConflict { .. })),
        "{conflict:?}"
    );

    let spend = |engines: &Vec<std::sync::Arc<Engine<S, SystemClock>>>, asks: usize| {
        let tasks: Vec<_> = engines
            .iter()
            .map(|e| {
                let e = e.clone();
                tokio::spawn(async move {
                    let (mut ok, mut short) = (0u32, 0u32);
                    for _ in 0..asks {
                        let d = e
                            .admit_async(&Request::new("acct").units("tokens", 1))
                            .await
                            .expect("admit");
                        if d.allowed {
                            ok += 1;
                        } else if matches!(d.reason, Some(Refusal::InsufficientBalance { .. })) {
                            short += 1;
                        }
                    }
                    (ok, short)
                })
            })
            .collect();
        async move {
            let mut sum = (0, 0);
            for t in tasks {
                let (ok, short) = t.await.expect("task");
                sum = (sum.0 + ok, sum.1 + short);
            }
            sum
        }
    };
    let (ok, short) = spend(&engines, 20).await;
    assert_eq!((ok, short), (100, 60), "exactly $1.00 of cents, never more");
    let b = engines[7].balance_async("acct").await.expect("balance");
    assert_eq!((b.available, b.remaining, b.debt), (usd(0), usd(0), usd(0)));

    engines[2]
        .top_up_async("acct", &TopUp::new("pay-2", usd(5), "USD"))
        .await
        .expect("second pack");
    let (ok, short) = spend(&engines, 2).await;
    assert_eq!((ok, short), (5, 11), "the second pack's five cents");
    let b = engines[0].balance_async("acct").await.expect("balance");
    assert_eq!(b.available, usd(0));
    assert!(b.grants.is_empty(), "spent grants are no longer listed");
}
