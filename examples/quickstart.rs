//! Load the Takos plans, bind an agent to the Free plan, and drive it through
//! Ok → Warning → Exceeded; spend a Pay-as-you-go agent's prepaid balance
//! down to a refusal; then print the Free agent's usage.
//!
//! Run with `cargo run --example quickstart`.

use rust_decimal::Decimal;
use tollgate::{Allocation, Catalog, Decision, Engine, Refusal, Request, TopUp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Plans live in configuration (TOML or JSON); a bad file fails here,
    // naming the field.
    let catalog: Catalog = toml::from_str(include_str!("takos_plans.toml"))?;
    let engine = Engine::new(catalog);
    engine.allocate(Allocation::new("agent-7", "plan_free"))?;
    engine.allocate(Allocation::new("agent-8", "plan_payg"))?;

    println!("agent-7 on plan_free: 20,000 input tokens a month, warning at 80 %\n");
    for tokens in [6_000, 6_000, 4_000, 4_000, 1] {
        let d = engine.admit(&Request::new("agent-7").units("llm_tokens_input", tokens))?;
        print_decision(tokens, &d);
    }

    // Browser time is not available on the Free plan (max 0).
    let d = engine.admit(&Request::new("agent-7").units("browser_seconds", 1))?;
    println!(
        "\nbrowser_seconds 1 on plan_free -> {:?}, allowed: {}",
        d.status, d.allowed
    );

    // Pay-as-you-go has no quotas: it spends a prepaid balance, bought in
    // packs. A redelivered payment webhook credits once.
    let pack = TopUp::new("pay_001", Decimal::new(100, 0), "USD");
    engine.top_up("agent-8", &pack)?;
    engine.top_up("agent-8", &pack)?;
    let request = Request::new("agent-8")
        .units("llm_tokens_input", 1_000)
        .units("llm_tokens_output", 200);
    println!("\nagent-8 on plan_payg, after one 100 USD pack:");
    for _ in 0..2 {
        let d = engine.admit(&request)?;
        let left = d.balance.as_ref().map(|b| b.available.normalize());
        match (&d.cost, &d.reason) {
            (Some(cost), Some(Refusal::InsufficientBalance { available, .. })) => println!(
                "admit 1,000 in + 200 out tokens ({} {}) -> refused: {} left (HTTP 402)",
                cost.amount.normalize(),
                cost.currency,
                available.amount.normalize()
            ),
            (Some(cost), _) => println!(
                "admit 1,000 in + 200 out tokens ({} {}) -> allowed: {}, balance left {}",
                cost.amount.normalize(),
                cost.currency,
                d.allowed,
                left.unwrap_or_default()
            ),
            (None, _) => println!("admit -> {:?}", d.status),
        }
    }

    let report = engine.usage("agent-7")?;
    println!("\nusage of {} ({}):", report.subject, report.plan);
    println!(
        "{:<24} {:>10} {:>10}  {:<8} period start",
        "meter", "used", "max", "status"
    );
    // Amounts in their public form: tokens and seconds as whole numbers,
    // money as a decimal of dollars, as a decision's limits read them.
    for m in report
        .meters
        .iter()
        .filter(|m| !m.used_amount().is_zero() || m.max_amount().is_some_and(|x| x.is_zero()))
    {
        let max = m
            .max_amount()
            .map_or("unlimited".to_string(), |x| x.to_string());
        let start = m
            .period_start
            .map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string());
        println!(
            "{:<24} {:>10} {:>10}  {:<8} {start}",
            m.meter.as_str(),
            m.used_amount(),
            max,
            format!("{:?}", m.status)
        );
    }
    Ok(())
}

fn print_decision(tokens: u64, d: &Decision) {
    let l = d.binding_limit().expect("the plan limits input tokens");
    let retry = d
        .retry_after
        .map(|r| format!(", retry in {} h", r.as_secs() / 3600))
        .unwrap_or_default();
    println!(
        "admit {tokens:>5} tokens -> {:<8} allowed: {:<5} used {:>6} of {}{retry}",
        format!("{:?}", d.status),
        d.allowed,
        l.used_amount(),
        l.max_amount().map_or("unlimited".into(), |m| m.to_string()),
    );
}
