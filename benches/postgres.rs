//! PostgreSQL throughput, in one run: `admit_async` of a four-limit plan
//! (day, week, rolling 24h/24 and lifetime on one meter) on a
//! `PostgresStore`, with the engine's event ids on (an `events` row per
//! admit) and off, beside a trivial one-row `UPDATE … RETURNING` on the
//! same server through the same client and pool size, each at 1 and 32
//! concurrent callers: all callers on one subject (one row for the
//! baseline), and at 32 callers also one subject (one row) per caller.
//! Two floors (see [`FLOORS`]) show what the table layout alone costs.
//!
//! `TOLLGATE_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --features postgres --bench postgres`
//! (skipped without the variable). `TOLLGATE_BENCH_SECS` sets the time per
//! case (default 3 s). Everything lives in a schema of its own, dropped
//! afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tollgate::store::PostgresConfig;
use tollgate::{
    Allocation, CatalogConfig, Engine, LimitConfig, Meter, Period, PlanConfig, Request,
    SystemClock, Window,
};

const POOL: usize = 32;

/// Run `op(caller)` from `tasks` tasks for `secs`; returns operations per
/// second.
async fn run<F, Fut>(tasks: usize, secs: f64, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut handles = Vec::new();
    for caller in 0..tasks {
        let (op, done) = (op.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            while Instant::now() < until {
                op(caller).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for h in handles {
        h.await.expect("bench task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Two floors, taking the admit's own argument (as the store encodes it, no
/// event id) and answering in its shape, that do only the table work a
/// layout needs and none of the logic (no roll, no limit, no hold, no
/// ledger): `floor4` locks the scope, reads the four counters as `apply()`
/// does (a primary-key probe each) and upserts them back in one statement,
/// on the store's own `counters` table; `floor1` locks the scope and reads
/// and updates one row holding all of the scope's counters (as Redis keeps
/// one hash): what a one-row-per-scope layout would cost if its logic were
/// free.
const FLOORS: &str = r#"
CREATE TABLE __SCHEMA__.floor_scopes (scope_kind text, scope_id text,
    used numeric(20,0)[] NOT NULL, ps bigint[], pe bigint[], head bigint[],
    tail bigint[], slots numeric(20,0)[], updated_ms bigint NOT NULL,
    PRIMARY KEY (scope_kind, scope_id));
CREATE FUNCTION __SCHEMA__.floor4(b jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    ops jsonb := b->'ops';
    now_ms bigint := (b->>'now')::bigint;
    lks jsonb := b->'lk';
    v text;
    cs __SCHEMA__.counters[];
    states jsonb;
BEGIN
    FOR i IN 0..jsonb_array_length(lks) - 1 LOOP
        v := pg_advisory_xact_lock(hashtextextended((b->>'ns') || '|s|' || (lks->>i), 0))::text;
    END LOOP;
    SELECT array_agg(ROW(q.e->>'k', q.e->>'s', q.e->>'m', q.e->>'w', coalesce(t.used, 0),
            t.period_start_ms, t.period_end_ms, t.bucket_ms, t.head, t.tail, t.slots,
            now_ms)::__SCHEMA__.counters ORDER BY q.i) INTO cs
    FROM jsonb_array_elements(ops) WITH ORDINALITY AS q(e, i)
    LEFT JOIN LATERAL (SELECT * FROM __SCHEMA__.counters x WHERE x.scope_kind = q.e->>'k'
        AND x.scope_id = q.e->>'s' AND x.meter = q.e->>'m' AND x."window" = q.e->>'w'
        OFFSET 0) t ON true;
    INSERT INTO __SCHEMA__.counters AS t SELECT (c).scope_kind, (c).scope_id, (c).meter,
        (c)."window", (c).used + 1, (c).period_start_ms, (c).period_end_ms, (c).bucket_ms,
        (c).head, (c).tail, (c).slots, now_ms
    FROM unnest(cs) c
    ON CONFLICT (scope_kind, scope_id, meter, "window") DO UPDATE SET used = excluded.used,
        period_start_ms = excluded.period_start_ms, period_end_ms = excluded.period_end_ms,
        head = excluded.head, tail = excluded.tail, slots = excluded.slots,
        updated_ms = excluded.updated_ms;
    SELECT jsonb_agg(jsonb_build_array((c).used + 1, 0, (c).period_start_ms,
        (c).period_end_ms, NULL)) INTO states FROM unnest(cs) c;
    RETURN jsonb_build_object('a', true, 'c', states, 's', '[]'::jsonb, 'cd', '[]'::jsonb);
END $$;
CREATE FUNCTION __SCHEMA__.floor1(b jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    ops jsonb := b->'ops';
    n int := jsonb_array_length(b->'ops');
    now_ms bigint := (b->>'now')::bigint;
    lks jsonb := b->'lk';
    k text := b->'ops'->0->>'k';
    s text := b->'ops'->0->>'s';
    v text;
    r record;
    states jsonb := '[]';
BEGIN
    FOR i IN 0..jsonb_array_length(lks) - 1 LOOP
        v := pg_advisory_xact_lock(hashtextextended((b->>'ns') || '|s|' || (lks->>i), 0))::text;
    END LOOP;
    SELECT * INTO r FROM __SCHEMA__.floor_scopes x WHERE x.scope_kind = k AND x.scope_id = s;
    IF NOT FOUND THEN
        INSERT INTO __SCHEMA__.floor_scopes VALUES (k, s, array_fill(0::numeric, ARRAY[n]),
            array_fill(0::bigint, ARRAY[n]), array_fill(0::bigint, ARRAY[n]),
            array_fill(0::bigint, ARRAY[n]), array_fill(0::bigint, ARRAY[n]),
            array_fill(0::numeric, ARRAY[25]), now_ms);
        SELECT * INTO r FROM __SCHEMA__.floor_scopes x WHERE x.scope_kind = k AND x.scope_id = s;
    END IF;
    FOR i IN 1..n LOOP
        r.used[i] := r.used[i] + (ops->(i - 1)->>'d')::numeric;
        states := states || jsonb_build_array(jsonb_build_array(r.used[i], 0, r.ps[i],
            r.pe[i], NULL));
    END LOOP;
    r.slots[1] := r.slots[1] + 1;
    UPDATE __SCHEMA__.floor_scopes x SET used = r.used, slots = r.slots, updated_ms = now_ms
    WHERE x.scope_kind = k AND x.scope_id = s;
    RETURN jsonb_build_object('a', true, 'c', states, 's', '[]'::jsonb, 'cd', '[]'::jsonb);
END $$;
"#;

/// The argument `PostgresStore` sends for the bench's admit of `who` (no
/// event id), for the floors.
fn floor_arg(schema: &str, who: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let x = i64::MAX;
    format!(
        r#"{{"cd":[],"hz":86400000,"lk":["subject:{who}"],"mode":"w","now":{now},"ns":"{schema}","ops":[{{"d":1,"k":"subject","m":"tokens","o":0,"p":"day","s":"{who}","t":"C","w":"day@0","x":{x}}},{{"d":1,"k":"subject","m":"tokens","o":0,"p":"week","s":"{who}","t":"C","w":"week@0","x":{x}}},{{"bw":3600000,"d":1,"k":"subject","m":"tokens","n":25,"s":"{who}","sp":86400000,"t":"R","w":"rolling:86400s/24","x":{x}}},{{"d":1,"k":"subject","m":"tokens","s":"{who}","t":"L","w":"lifetime","x":{x}}}]}}"#
    )
}

fn main() {
    let Ok(url) = std::env::var("TOLLGATE_POSTGRES_URL") else {
        eprintln!("skipped: TOLLGATE_POSTGRES_URL not set");
        return;
    };
    let secs: f64 = std::env::var("TOLLGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(url, secs));
}

/// The task counts and subject spreads of the cases: 1 caller, 32 callers
/// on one subject (one row), 32 callers on a subject (a row) each.
const CASES: [(usize, bool); 3] = [(1, false), (32, false), (32, true)];

/// `admit_async` by `tasks` callers through a store of its own (a pool
/// of [`POOL`] connections, closed when the case ends, so that the run
/// never holds more than two pools' worth of connections).
async fn admit_case(
    url: &str,
    schema: &str,
    catalog: &tollgate::Catalog,
    ids: bool,
    (tasks, spread): (usize, bool),
    secs: f64,
) -> f64 {
    let store = PostgresConfig::new(url)
        .schema(schema)
        .pool_size(POOL)
        .timeout(Duration::from_secs(30))
        .engine_event_ids(ids)
        .connect()
        .await
        .expect("connect PostgresStore");
    let engine = Arc::new(Engine::with_store_and_clock(
        catalog.clone(),
        store,
        SystemClock,
    ));
    let subjects: Arc<Vec<String>> = Arc::new((0..POOL).map(|i| format!("agent{i}")).collect());
    for s in subjects.iter() {
        engine
            .allocate(Allocation::new(s.as_str(), "plan"))
            .expect("allocate");
    }
    run(tasks, secs, move |caller| {
        let e = engine.clone();
        let who = subjects[if spread { caller } else { 0 }].clone();
        async move {
            let d = e
                .admit_async(&Request::new(&who).units("tokens", 1))
                .await
                .expect("admit");
            assert!(d.allowed);
        }
    })
    .await
}

async fn bench(url: String, secs: f64) {
    let schema = format!("tollgate_bench_{}", std::process::id());
    let admin = PostgresConfig::new(url.clone())
        .schema(schema.clone())
        .pool_size(1)
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect PostgresStore");
    admin.migrate().await.expect("migrate");
    let big = u64::MAX / 2;
    let catalog = CatalogConfig::default()
        .meter(Meter::count("tokens"))
        .plan(
            PlanConfig::new("plan")
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Day),
                    big,
                ))
                .limit(LimitConfig::new(
                    "tokens",
                    Window::calendar(Period::Week),
                    big,
                ))
                .limit(LimitConfig::new(
                    "tokens",
                    Window::Rolling {
                        span_secs: 86_400,
                        buckets: 24,
                    },
                    big,
                ))
                .limit(LimitConfig::new("tokens", Window::Lifetime, big)),
        )
        .build()
        .expect("catalog");
    println!("case                                          tasks    ops/s   (µs/op at 1 task; {secs} s each)");
    let pg: tokio_postgres::Config = url.parse().expect("url");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(POOL).build().expect("pool");
    {
        let c = pool.get().await.expect("connect");
        c.batch_execute(&format!(
            "CREATE TABLE \"{schema}\".trivial (id int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO \"{schema}\".trivial SELECT g, 0 FROM generate_series(0, {}) g;",
            POOL - 1
        ))
        .await
        .expect("trivial table");
        c.batch_execute(&FLOORS.replace("__SCHEMA__", &format!("\"{schema}\"")))
            .await
            .expect("floor functions");
    }
    let update = Arc::new(format!(
        "UPDATE \"{schema}\".trivial SET n = n + 1 WHERE id = $1 RETURNING n"
    ));
    let floors = [
        (
            "4 rows",
            format!("SELECT \"{schema}\".floor4($1::text::jsonb)::text"),
        ),
        (
            "1 row",
            format!("SELECT \"{schema}\".floor1($1::text::jsonb)::text"),
        ),
    ];

    let mut results = Vec::new();
    for (tasks, spread) in CASES {
        let subject = if spread {
            "a subject each"
        } else {
            "one subject"
        };
        // Engine-made event ids on (the default: an `events` row per
        // admit), then off.
        for (ids, label) in [(true, "event ids"), (false, "no ids")] {
            let ops = admit_case(&url, &schema, &catalog, ids, (tasks, spread), secs).await;
            results.push((format!("admit, 4 limits, {subject}, {label}"), tasks, ops));
        }

        let (p, sql) = (pool.clone(), update.clone());
        let trivial = run(tasks, secs, move |caller| {
            let (p, sql) = (p.clone(), sql.clone());
            let id = if spread { caller as i32 } else { 0 };
            async move {
                let c = p.get().await.expect("pool");
                let stmt = c.prepare_cached(&sql).await.expect("prepare");
                let row = c.query_one(&stmt, &[&id]).await.expect("update");
                assert!(row.get::<_, i64>(0) > 0);
            }
        })
        .await;
        let row = if spread { "a row each" } else { "one row" };
        results.push((format!("trivial UPDATE … RETURNING, {row}"), tasks, trivial));

        for (name, sql) in &floors {
            let (p, sql, ns) = (pool.clone(), Arc::new(sql.clone()), schema.clone());
            let ops = run(tasks, secs, move |caller| {
                let (p, sql) = (p.clone(), sql.clone());
                let who = format!("floor{}", if spread { caller } else { 0 });
                let arg = floor_arg(&ns, &who);
                async move {
                    let c = p.get().await.expect("pool");
                    let stmt = c.prepare_cached(&sql).await.expect("prepare");
                    let row = c.query_one(&stmt, &[&arg]).await.expect("floor");
                    assert!(row.get::<_, String>(0).starts_with('{'));
                }
            })
            .await;
            results.push((format!("floor, {name} per scope, {subject}"), tasks, ops));
        }
    }
    for (name, tasks, ops) in &results {
        let per = if *tasks == 1 {
            format!("{:.0} µs", 1e6 / ops)
        } else {
            String::new()
        };
        println!("{name:<45} {tasks:>5} {ops:>9.0}   {per}");
    }
    for group in results.chunks(5) {
        for case in group.iter().filter(|c| c.0 != group[2].0) {
            println!(
                "{} / trivial at {} tasks: {:.2}×",
                case.0,
                case.1,
                case.2 / group[2].2
            );
        }
    }
    drop(pool);
    admin.drop_schema().await.expect("drop schema");
}
