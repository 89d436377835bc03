//! `tollgate replay` and `tollgate usage`, run as the binary: outputs and
//! exit codes, with bad input among them.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use tollgate::{Allocation, Catalog, Engine, ManualClock, Request};

const PLANS: &str = "examples/takos_plans.toml";
const LOG: &str = "examples/usage_log.jsonl";

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("the tollgate binary runs")
}

/// A file named `name` in a directory of this test binary's own.
fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Replay with `--json`; the report and stderr.
fn replay_json(args: &[&str]) -> (Output, Value) {
    let mut all = vec!["replay", "--json"];
    all.extend_from_slice(args);
    let o = tollgate(&all);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&o.stdout), text(&o.stderr)));
    (o, v)
}

fn subject<'v>(report: &'v Value, id: &str) -> &'v Value {
    report["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == id)
        .unwrap_or_else(|| panic!("no subject {id} in {report:#}"))
}

fn refused(s: &Value, reason: &str, meter: &str) -> u64 {
    s["refused"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == reason && r["meter"] == meter)
        .map_or(0, |r| r["count"].as_u64().unwrap())
}

fn peak<'v>(s: &'v Value, meter: &str) -> &'v Value {
    s["peaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["meter"] == meter)
        .unwrap_or_else(|| panic!("no peak for {meter} in {s:#}"))
}

#[test]
fn the_shipped_log_replays_per_subject_and_per_plan() {
    let (o, r) = replay_json(&[
        "--plans",
        PLANS,
        "--log",
        LOG,
        "--plan",
        "agent-9=plan_payg",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(r["lines"], 13);
    assert_eq!(r["events"], 11);

    // agent-7 on the free plan (the first): 12,000 + 6,000 input tokens fit
    // 20,000, the next 4,000 do not; browser time is not available (max 0).
    let a7 = subject(&r, "agent-7");
    assert_eq!(a7["plan"], "plan_free");
    assert_eq!(a7["requests"], 6);
    assert_eq!(a7["admitted"], 3);
    assert_eq!(a7["duplicates"], 1);
    assert_eq!(refused(a7, "limit_exceeded", "llm_tokens_input"), 1);
    assert_eq!(refused(a7, "limit_exceeded", "browser_seconds"), 1);
    assert_eq!(refused(a7, "limit_exceeded", "llm_tokens_output"), 1);
    assert_eq!(peak(a7, "llm_tokens_input")["peak"], "18000");
    assert_eq!(peak(a7, "llm_tokens_input")["max"], "20000");
    assert_eq!(a7["cost"], Value::Null);
    // Every limit of the plan is listed, those no request touched at 0.
    assert_eq!(a7["peaks"].as_array().unwrap().len(), 11);
    assert_eq!(peak(a7, "r2_storage_gb_month")["peak"], "0");
    assert_eq!(peak(a7, "r2_storage_gb_month")["max"], "1");

    // agent-9 on pay-as-you-go: exact cost, 1,206 + 2,700 + 6,900 USD.
    let a9 = subject(&r, "agent-9");
    assert_eq!(a9["admitted"], 3);
    assert_eq!(a9["cost"]["amount"], "10806");
    assert_eq!(a9["cost"]["currency"], "USD");
    assert_eq!(peak(a9, "agent_runtime_seconds")["peak"], "3600");

    let plans = r["plans"].as_array().unwrap();
    let free = plans.iter().find(|p| p["plan"] == "plan_free").unwrap();
    assert_eq!(free["subjects"], 2);
    assert_eq!(free["requests"], 8);
    assert_eq!(free["admitted"], 4);
    assert_eq!(refused(free, "limit_exceeded", "embedding_count"), 1);

    // The two bad lines, by number, and the replay went on past them.
    let bad = r["bad_lines"].as_array().unwrap();
    let lines: Vec<u64> = bad.iter().map(|b| b["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, [8, 11]);
    assert!(bad[0]["reason"].as_str().unwrap().contains("whole units"));
    let err = text(&o.stderr);
    assert!(err.contains("usage_log.jsonl: line 8:"), "{err}");
    assert!(err.contains("usage_log.jsonl: line 11:"), "{err}");
}

#[test]
fn a_plan_change_is_a_what_if() {
    // Everyone on pay-as-you-go: nothing refused, a repeated event id
    // costs once (2,313.25, not 2,493.50).
    let (o, r) = replay_json(&["--plans", PLANS, "--log", LOG, "--plan", "*=plan_payg"]);
    assert!(o.status.success());
    let a7 = subject(&r, "agent-7");
    assert_eq!(a7["plan"], "plan_payg");
    assert_eq!(a7["admitted"], 6);
    assert_eq!(a7["cost"]["amount"], "2313.25");
    assert_eq!(r["plans"].as_array().unwrap().len(), 1);
    assert_eq!(r["plans"][0]["cost"]["amount"], "13121.95");
}

#[test]
fn strict_stops_at_the_first_bad_line() {
    let (o, r) = replay_json(&["--plans", PLANS, "--log", LOG, "--strict"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(r["stopped"], true);
    assert_eq!(r["lines"], 8);
    assert_eq!(r["bad_lines"].as_array().unwrap().len(), 1);
}

#[test]
fn a_csv_log_replays_as_its_json_twin() {
    let csv = file(
        "log.csv",
        "ts,subject,event,llm_tokens_input,llm_tokens_output\n\
         2026-04-01T09:00:00Z,agent-7,e-1,12000,3000\n\
         1775034000000,agent-7,,6000,\n\
         2026-04-01T11:00:00Z,agent-7,,4000,\n\
         2026-04-01T12:00:00Z,agent-7,,many,\n\
         2026-04-01T12:00:00Z,agent-7\n",
    );
    let (o, r) = replay_json(&["--plans", PLANS, "--log", csv.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let a7 = subject(&r, "agent-7");
    assert_eq!(a7["requests"], 3);
    assert_eq!(a7["admitted"], 2);
    assert_eq!(refused(a7, "limit_exceeded", "llm_tokens_input"), 1);
    let lines: Vec<u64> = r["bad_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [5, 6]);

    let headless = file("headless.csv", "when,who\n1,a\n");
    let o = tollgate(&[
        "replay",
        "--plans",
        PLANS,
        "--log",
        headless.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no `ts` column"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn bad_lines_of_every_kind_are_reported_and_skipped() {
    let log = file(
        "bad.jsonl",
        "{\"ts\": \"yesterday\", \"subject\": \"a\"}\n\
         {\"ts\": 1, \"subject\": \"a\", \"amounts\": {\"llm_tokens_input\": 0.5}}\n\
         {\"ts\": 1, \"subject\": \"a\", \"amounts\": {\"nope\": 1}}\n\
         {\"ts\": 1, \"subject\": \"a\", \"amounts\": {\"llm_tokens_input\": -3}}\n\
         {\"ts\": 1, \"subject\": \"a\", \"colour\": \"red\"}\n\
         \n\
         {\"ts\": 1, \"subject\": \"a\", \"amounts\": {\"llm_tokens_input\": 10}}\n",
    );
    let (o, r) = replay_json(&["--plans", PLANS, "--log", log.to_str().unwrap()]);
    assert!(o.status.success());
    let bad: Vec<(u64, String)> = r["bad_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["line"].as_u64().unwrap(),
                b["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let lines: Vec<u64> = bad.iter().map(|b| b.0).collect();
    assert_eq!(lines, [1, 2, 3, 4, 5], "{bad:?}");
    assert!(bad[1].1.contains("write it as a string"), "{bad:?}");
    assert!(bad[2].1.contains("unknown meter `nope`"), "{bad:?}");
    // Only the good line counted.
    let a = subject(&r, "a");
    assert_eq!(a["requests"], 1);
    assert_eq!(peak(a, "llm_tokens_input")["peak"], "10");
}

#[test]
fn bad_arguments_fail_before_replaying() {
    let o = tollgate(&[
        "replay",
        "--plans",
        PLANS,
        "--log",
        LOG,
        "--plan",
        "a=plan_gold",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no plan `plan_gold`"));
    assert!(o.stdout.is_empty());

    let o = tollgate(&[
        "replay", "--plans", PLANS, "--log", LOG, "--plan", "nonsense",
    ]);
    assert_eq!(o.status.code(), Some(2));

    let o = tollgate(&["replay", "--plans", PLANS, "--log", "/nonexistent.jsonl"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("cannot open"));

    let bad_plans = file(
        "bad_plans.json",
        r#"{"meters": [{"id": "", "unit": "count"}]}"#,
    );
    let o = tollgate(&[
        "replay",
        "--plans",
        bad_plans.to_str().unwrap(),
        "--log",
        LOG,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("meters[0].id"));
}

#[test]
fn the_chart_plots_each_limit_against_its_maximum() {
    let svg = std::env::temp_dir().join(format!("tollgate-chart-{}.svg", std::process::id()));
    let o = tollgate(&[
        "replay",
        "--plans",
        PLANS,
        "--log",
        LOG,
        "--chart",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"));
    assert!(chart.trim_end().ends_with("</svg>"));
    assert!(chart.contains("subject:agent-7 llm_tokens_input (month) — peak 18000 of 20000"));
    // A maximum line (dashed) and a use line per panel.
    assert!(chart.contains("stroke-dasharray"));
    assert!(chart.matches("<path").count() >= 2);
    // The report still printed as text.
    assert!(text(&o.stdout).contains("subject agent-7 (plan plan_free)"));
}

#[test]
fn usage_reads_a_snapshot_and_refuses_a_broken_one() {
    let catalog: Catalog = toml::from_str(&std::fs::read_to_string(PLANS).unwrap()).unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2026-04-08T12:00:00Z")
        .unwrap()
        .to_utc();
    let engine = Engine::with_clock(catalog, ManualClock::new(start));
    engine
        .allocate(Allocation::new("agent-7", "plan_free"))
        .unwrap();
    let d = engine
        .admit(
            &Request::new("agent-7")
                .units("llm_tokens_input", 1_200)
                .units("agent_runtime_seconds", 60),
        )
        .unwrap();
    assert!(d.allowed);
    let snap = serde_json::to_string(&engine.store().snapshot()).unwrap();
    let path = file("snap.json", &snap);

    let o = tollgate(&["usage", "--snapshot", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("subject:agent-7"), "{out}");
    assert!(
        out.contains("llm_tokens_input (month 2026-04-01T00:00:00+00:00 .. 2026-05-01T00:00:00+00:00): used 1200, held 0"),
        "{out}"
    );
    assert!(
        out.contains("agent_runtime_seconds (rolling 1w/168): used 60"),
        "{out}"
    );

    let o = tollgate(&["usage", "--json", "--snapshot", path.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["counters"].as_array().unwrap().len(), 2);

    // In May, April's tokens are a closed period's kept total.
    engine.clock().set(
        chrono::DateTime::parse_from_rfc3339("2026-05-02T00:00:00Z")
            .unwrap()
            .to_utc(),
    );
    engine
        .admit(&Request::new("agent-7").units("llm_tokens_input", 5))
        .unwrap();
    let may = file(
        "may.json",
        &serde_json::to_string(&engine.store().snapshot()).unwrap(),
    );
    let o = tollgate(&["usage", "--snapshot", may.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert!(
        out.contains("llm_tokens_input (month 2026-04-01T00:00:00+00:00 .. 2026-05-01T00:00:00+00:00): closed, used 1200"),
        "{out}"
    );
    assert!(out.contains("1 closed periods"), "{out}");

    // A tampered total is refused by the store's checks: exit 1.
    let mut broken: Value = serde_json::from_str(&snap).unwrap();
    let counters = broken["scopes"][0][1].as_array_mut().unwrap();
    let rolling = counters
        .iter_mut()
        .find(|c| c["meter"] == "agent_runtime_seconds")
        .unwrap();
    rolling["data"]["rolling"]["total"] = Value::from(999);
    let path = file("broken.json", &broken.to_string());
    let o = tollgate(&["usage", "--snapshot", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("invalid snapshot"),
        "{}",
        text(&o.stderr)
    );
    let o = tollgate(&["usage", "--snapshot", "/nonexistent.json"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_starting_balance_refuses_what_it_cannot_pay_for() {
    // Everyone on pay-as-you-go with $2,500 of credit each: agent-7's
    // 2,313.25 fits; agent-9's 1,206 does, then 2,700 and 6,900 do not
    // (1,294 left), refused for the balance, not for a limit.
    let (o, r) = replay_json(&[
        "--plans",
        PLANS,
        "--log",
        LOG,
        "--plan",
        "*=plan_payg",
        "--balance",
        "2500",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let a7 = subject(&r, "agent-7");
    assert_eq!(a7["admitted"], 6);
    assert_eq!(a7["cost"]["amount"], "2313.25");
    let a9 = subject(&r, "agent-9");
    assert_eq!(a9["requests"], 3);
    assert_eq!(a9["admitted"], 1);
    assert_eq!(a9["cost"]["amount"], "1206");
    let by_balance = a9["refused"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["reason"] == "insufficient_balance")
        .expect("refused for the balance");
    assert_eq!(by_balance["count"], 2);
    assert_eq!(by_balance["meter"], Value::Null);
}

#[test]
fn a_log_cannot_write_terminal_escapes() {
    // A subject id with an escape sequence, and a bad line quoting one.
    let log = file(
        "escapes.jsonl",
        concat!(
            r#"{"ts": "2026-04-01T09:00:00Z", "subject": "ev\u001b[2Jil", "amounts": {"llm_tokens_input": 10}}"#,
            "\n",
            r#"{"ts": "2026-04-01T09:00:00Z", "subject": "x", "amounts": {"no\u001b[31m_such": 1}}"#,
            "\n",
        ),
    );
    let o = tollgate(&["replay", "--plans", PLANS, "--log", log.to_str().unwrap()]);
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        assert!(
            !bytes.contains(&0x1b),
            "{name} holds a raw ESC: {}",
            text(bytes)
        );
    }
    assert!(
        text(&o.stdout).contains(r"subject ev\u{1b}[2Jil"),
        "{}",
        text(&o.stdout)
    );
}
