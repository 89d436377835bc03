-- tollgate PostgreSQL store, schema version 1.
-- `__SCHEMA__` is replaced by the store's schema (quoted) when `migrate()`
-- runs this file, inside one transaction. Amounts are u64 kept as
-- numeric(20,0) (exact; checked against 2^64 - 1); instants are bigint Unix
-- milliseconds. See src/store/postgres/mod.rs for the contract's rules.

-- Counters a host can read: one row per (scope, meter, window).
-- `window` is a code: `day@0` (calendar period @ UTC offset seconds),
-- `rolling:<span secs>s/<buckets>`, `lifetime`, `concurrent`.
-- `used` is the usage counted in the counter's current period (calendar),
-- in its buckets (rolling: the sum of `slots`) or ever (lifetime); it is as
-- of the last batch that wrote the row (a period that ended since reads 0).
CREATE TABLE IF NOT EXISTS __SCHEMA__.counters (
    scope_kind text NOT NULL,            -- 'subject' | 'pool'
    scope_id text NOT NULL,
    meter text NOT NULL,
    "window" text NOT NULL,
    used numeric(20,0) NOT NULL DEFAULT 0,
    period_start_ms bigint,              -- calendar: the period [start, end)
    period_end_ms bigint,
    bucket_ms bigint,                    -- rolling: bucket width
    head bigint,                         -- rolling: newest bucket index
    tail bigint,                         -- rolling: oldest bucket holding usage
    slots numeric(20,0)[],               -- rolling: bucket b at slots[b mod n + 1]
    updated_ms bigint NOT NULL,
    PRIMARY KEY (scope_kind, scope_id, meter, "window")
);

-- Leases (reservations): live while NOT settled AND now < expires_ms.
CREATE TABLE IF NOT EXISTS __SCHEMA__.leases (
    id text PRIMARY KEY,
    owner_kind text NOT NULL,
    owner_id text NOT NULL,
    opened_ms bigint NOT NULL,
    expires_ms bigint NOT NULL,
    deadline_ms bigint,
    settled boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS leases_deadline ON __SCHEMA__.leases (deadline_ms)
    WHERE deadline_ms IS NOT NULL AND NOT settled;

-- A lease's holds, in the order it took them (seq); removed when it settles.
-- A hold counts on its counter while its lease is live.
CREATE TABLE IF NOT EXISTS __SCHEMA__.holds (
    lease_id text NOT NULL REFERENCES __SCHEMA__.leases (id) ON DELETE CASCADE,
    seq int NOT NULL,
    scope_kind text NOT NULL,
    scope_id text NOT NULL,
    meter text NOT NULL,
    "window" text NOT NULL,
    amount numeric(20,0) NOT NULL,
    PRIMARY KEY (lease_id, seq)
);
CREATE INDEX IF NOT EXISTS holds_counter
    ON __SCHEMA__.holds (scope_kind, scope_id, meter, "window");

-- The idempotency ledger: an event id, its fingerprint, when it applied and
-- the answer it gave (replayed within the horizon).
CREATE TABLE IF NOT EXISTS __SCHEMA__.events (
    id text PRIMARY KEY,
    fingerprint numeric(20,0) NOT NULL,
    at_ms bigint NOT NULL,
    answer jsonb NOT NULL
);

-- Cooldowns: a scope refuses WithinLimits and Check batches until until_ms.
CREATE TABLE IF NOT EXISTS __SCHEMA__.cooldowns (
    scope_kind text NOT NULL,
    scope_id text NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (scope_kind, scope_id)
);

-- A counter as a batch works on it, in memory (the function's variables).
DROP TYPE IF EXISTS __SCHEMA__.ctr CASCADE;
CREATE TYPE __SCHEMA__.ctr AS (
    ex boolean,        -- a row exists (or the batch makes one)
    kind text,         -- C R L X
    used numeric,
    held numeric,
    ps bigint,         -- calendar period
    pe bigint,
    bw bigint,         -- rolling bucket width, slot count, head, tail, slots
    n int,
    head bigint,
    tail bigint,
    slots numeric[],
    dirty boolean,     -- write it back
    xh boolean         -- holds of ended leases to drop
);

-- Floor division and Euclidean remainder.
CREATE OR REPLACE FUNCTION __SCHEMA__.fdiv(a bigint, b bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT (a - (((a % b) + b) % b)) / b $$;

CREATE OR REPLACE FUNCTION __SCHEMA__.emod(a bigint, b bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT ((a % b) + b) % b $$;

-- The calendar period [start, next) containing now_ms: period 'day',
-- 'week' (Monday) or 'month', at UTC offset off_s seconds.
CREATE OR REPLACE FUNCTION __SCHEMA__.bounds(period text, off_s int, now_ms bigint,
    OUT s bigint, OUT e bigint)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    off_ms bigint := off_s::bigint * 1000;
    day bigint := __SCHEMA__.fdiv(now_ms + off_ms, 86400000);
    d0 bigint;
    d1 bigint;
    fst date;
BEGIN
    IF period = 'day' THEN
        d0 := day; d1 := day + 1;
    ELSIF period = 'week' THEN
        d0 := day - __SCHEMA__.emod(day + 3, 7); d1 := d0 + 7;
    ELSE
        fst := date_trunc('month', (date '1970-01-01' + day::int)::timestamp)::date;
        d0 := fst - date '1970-01-01';
        d1 := (fst + interval '1 month')::date - date '1970-01-01';
    END IF;
    s := d0 * 86400000 - off_ms;
    e := d1 * 86400000 - off_ms;
END $$;

-- Roll a counter to now_ms (contract rule 2): a calendar counter past its
-- period (or, holding nothing, before it) takes now's period at zero; a
-- rolling one drops the buckets that left (never moving back while it
-- holds usage). Sets dirty when anything changed.
CREATE OR REPLACE FUNCTION __SCHEMA__.roll(c __SCHEMA__.ctr, period text, off_s int,
    now_ms bigint) RETURNS __SCHEMA__.ctr
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    cur bigint;
    steps bigint;
    i int;
    b record;
BEGIN
    IF c.kind = 'C' THEN
        IF c.ps IS NULL OR now_ms >= c.pe OR (now_ms < c.ps AND c.used = 0) THEN
            SELECT * INTO b FROM __SCHEMA__.bounds(period, off_s, now_ms);
            IF c.ps IS DISTINCT FROM b.s THEN
                c.ps := b.s; c.pe := b.e; c.used := 0; c.dirty := true;
            END IF;
        END IF;
    ELSIF c.kind = 'R' THEN
        cur := __SCHEMA__.fdiv(now_ms, c.bw);
        IF c.head IS NULL THEN
            c.head := cur; c.tail := cur; c.used := 0;
            c.slots := array_fill(0::numeric, ARRAY[c.n]);
            RETURN c;
        END IF;
        IF cur <= c.head THEN
            IF cur < c.head AND c.used = 0 THEN
                c.head := cur; c.tail := cur; c.dirty := true;
            END IF;
            RETURN c;
        END IF;
        steps := least(cur - c.head, c.n);
        FOR k IN 1..steps LOOP
            i := __SCHEMA__.emod(c.head + k, c.n) + 1;
            c.used := c.used - c.slots[i];
            c.slots[i] := 0;
        END LOOP;
        c.head := cur;
        IF c.used = 0 THEN
            c.tail := cur;
        ELSIF c.tail < cur - c.n + 1 THEN
            c.tail := cur - c.n + 1;
            WHILE c.slots[__SCHEMA__.emod(c.tail, c.n) + 1] = 0 LOOP
                c.tail := c.tail + 1;
            END LOOP;
        END IF;
        c.dirty := true;
    END IF;
    RETURN c;
END $$;

-- Add usage to a rolled counter.
CREATE OR REPLACE FUNCTION __SCHEMA__.add(c __SCHEMA__.ctr, delta numeric)
RETURNS __SCHEMA__.ctr
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i int;
BEGIN
    IF delta = 0 OR c.kind = 'X' THEN
        RETURN c;
    END IF;
    IF c.kind = 'R' THEN
        IF c.used = 0 THEN
            c.tail := c.head;
        END IF;
        i := __SCHEMA__.emod(c.head, c.n) + 1;
        c.slots[i] := c.slots[i] + delta;
    END IF;
    c.used := c.used + delta;
    c.ex := true;
    c.dirty := true;
    RETURN c;
END $$;

-- A counter's state as the answer reports it: [used, held, period_start,
-- resets_at, available_at] (see CounterState). delta: the op's delta if the
-- batch did not apply, else 0.
CREATE OR REPLACE FUNCTION __SCHEMA__.state(c __SCHEMA__.ctr, now_ms bigint, span_ms bigint,
    delta numeric, mx numeric) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    ov boolean := mx IS NOT NULL AND c.used + c.held + delta > mx;
    pending numeric := c.held + delta;
    need numeric;
    freed numeric := 0;
    av bigint;
BEGIN
    IF c.kind = 'C' THEN
        IF ov AND pending <= mx THEN
            av := c.pe;
        END IF;
        RETURN jsonb_build_array(c.used, c.held, c.ps, c.pe, av);
    ELSIF c.kind = 'R' THEN
        IF ov AND c.ex AND pending <= mx THEN
            need := c.used + pending - mx;
            FOR b IN c.tail..c.head LOOP
                freed := freed + c.slots[__SCHEMA__.emod(b, c.n) + 1];
                IF freed >= need THEN
                    av := (b + c.n) * c.bw;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        RETURN jsonb_build_array(c.used, c.held, now_ms - span_ms,
            CASE WHEN c.ex AND c.used > 0 THEN (c.tail + c.n) * c.bw END, av);
    END IF;
    RETURN jsonb_build_array(c.used, c.held, NULL, NULL, NULL);
END $$;

-- Write a counter back.
CREATE OR REPLACE FUNCTION __SCHEMA__.put(c __SCHEMA__.ctr, sk text, sid text, m text,
    w text, now_ms bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO __SCHEMA__.counters AS t (scope_kind, scope_id, meter, "window", used,
        period_start_ms, period_end_ms, bucket_ms, head, tail, slots, updated_ms)
    VALUES (sk, sid, m, w, c.used, c.ps, c.pe,
        CASE WHEN c.kind = 'R' THEN c.bw END, c.head, c.tail, c.slots, now_ms)
    ON CONFLICT (scope_kind, scope_id, meter, "window") DO UPDATE SET
        used = excluded.used, period_start_ms = excluded.period_start_ms,
        period_end_ms = excluded.period_end_ms, head = excluded.head,
        tail = excluded.tail, slots = excluded.slots, updated_ms = excluded.updated_ms
$$;

-- Zero the holds on a counter whose lease ended by now_ms (a batch that
-- applies drops them, as rolling; see contract rule 7).
CREATE OR REPLACE FUNCTION __SCHEMA__.drop_expired(sk text, sid text, m text, w text,
    now_ms bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE __SCHEMA__.holds h SET amount = 0 FROM __SCHEMA__.leases l
    WHERE h.scope_kind = sk AND h.scope_id = sid AND h.meter = m AND h."window" = w
      AND h.amount > 0 AND l.id = h.lease_id AND l.expires_ms <= now_ms
$$;

-- A window code's parts: its kind (C R L X), calendar period and offset.
CREATE OR REPLACE FUNCTION __SCHEMA__.win_kind(w text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN w = 'lifetime' THEN 'L' WHEN w = 'concurrent' THEN 'X'
        WHEN w LIKE 'rolling:%' THEN 'R' ELSE 'C' END
$$;

CREATE OR REPLACE FUNCTION __SCHEMA__.win_period(w text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT split_part(w, '@', 1) $$;

CREATE OR REPLACE FUNCTION __SCHEMA__.win_off(w text) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN position('@' IN w) > 0 THEN split_part(w, '@', 2)::int ELSE 0 END
$$;

-- A counter row (or none: ex false) as a batch works on it.
CREATE OR REPLACE FUNCTION __SCHEMA__.load(w text, used numeric, ps bigint, pe bigint,
    bw bigint, head bigint, tail bigint, slots numeric[], ex boolean)
RETURNS __SCHEMA__.ctr
LANGUAGE sql IMMUTABLE AS $$
    SELECT ROW(ex, __SCHEMA__.win_kind(w), coalesce(used, 0), 0::numeric,
        CASE WHEN ex THEN ps END, CASE WHEN ex THEN pe END, bw,
        array_length(slots, 1), CASE WHEN ex THEN head END, tail, slots,
        false, false)::__SCHEMA__.ctr
$$;

-- Roll an existing counter of a settling lease's hold (not named by an op),
-- add its charge, write it back, and drop its expired holds.
CREATE OR REPLACE FUNCTION __SCHEMA__.charge(sk text, sid text, m text, w text,
    charged numeric, now_ms bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    c __SCHEMA__.ctr;
BEGIN
    SELECT * INTO t FROM __SCHEMA__.counters x WHERE x.scope_kind = sk
        AND x.scope_id = sid AND x.meter = m AND x."window" = w;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    c := __SCHEMA__.load(w, t.used, t.period_start_ms, t.period_end_ms, t.bucket_ms,
        t.head, t.tail, t.slots, true);
    c := __SCHEMA__.roll(c, __SCHEMA__.win_period(w), __SCHEMA__.win_off(w), now_ms);
    c := __SCHEMA__.add(c, charged);
    IF c.dirty THEN
        PERFORM __SCHEMA__.put(c, sk, sid, m, w, now_ms);
    END IF;
    PERFORM __SCHEMA__.drop_expired(sk, sid, m, w, now_ms);
END $$;

-- A renewal writes its lease's counters: each rolled, its expired holds
-- dropped.
CREATE OR REPLACE FUNCTION __SCHEMA__.roll_holds(lease text, now_ms bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    h record;
BEGIN
    FOR h IN SELECT DISTINCT scope_kind, scope_id, meter, "window"
        FROM __SCHEMA__.holds WHERE lease_id = lease
    LOOP
        PERFORM __SCHEMA__.charge(h.scope_kind, h.scope_id, h.meter, h."window", 0, now_ms);
    END LOOP;
END $$;

-- Rule 8: the answer to replay for the batch's event id (NULL: none), or
-- TGCON for an id applied with another fingerprint. Locks the id first.
CREATE OR REPLACE FUNCTION __SCHEMA__.ledger(b jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    ev jsonb := b->'event';
    r record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended((b->>'ns') || '|e|' || (ev->>'id'), 0));
    SELECT * INTO r FROM __SCHEMA__.events WHERE id = ev->>'id';
    IF FOUND AND (b->>'now')::bigint - r.at_ms < (b->>'hz')::bigint THEN
        IF r.fingerprint <> (b->>'efp')::numeric THEN
            RAISE EXCEPTION USING ERRCODE = 'TGCON', MESSAGE = ev->>'id';
        END IF;
        RETURN r.answer || jsonb_build_object('r', r.at_ms);
    END IF;
    RETURN NULL;
END $$;

-- Rule 7: lock the batch's lease and check it can take the action (TGINV,
-- TGUNK, TGSET, TGEXP otherwise). Returns the scopes to lock: lks with the
-- scopes of the lease's holds, sorted bytewise and distinct.
CREATE OR REPLACE FUNCTION __SCHEMA__.lease_check(b jsonb, lks jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    ls jsonb := b->'lease';
    lrec record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended((b->>'ns') || '|l|' || (ls->>'id'), 0));
    SELECT * INTO lrec FROM __SCHEMA__.leases WHERE id = ls->>'id';
    IF ls->>'a' = 'open' THEN
        IF FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'TGINV',
                MESSAGE = format('lease %s is already open', ls->>'id');
        END IF;
        RETURN lks;
    ELSIF NOT FOUND OR lrec.owner_kind <> ls->>'ok' OR lrec.owner_id <> ls->>'os' THEN
        RAISE EXCEPTION USING ERRCODE = 'TGUNK', MESSAGE = ls->>'id';
    ELSIF lrec.settled THEN
        RAISE EXCEPTION USING ERRCODE = 'TGSET', MESSAGE = ls->>'id';
    ELSIF (b->>'now')::bigint >= lrec.expires_ms THEN
        RAISE EXCEPTION USING ERRCODE = 'TGEXP', MESSAGE = ls->>'id';
    END IF;
    SELECT coalesce(jsonb_agg(to_jsonb(q.s) ORDER BY q.s COLLATE "C"), '[]') INTO lks
    FROM (SELECT DISTINCT u.s FROM (SELECT jsonb_array_elements_text(lks) AS s
        UNION ALL SELECT x.scope_kind || ':' || x.scope_id FROM __SCHEMA__.holds x
        WHERE x.lease_id = ls->>'id') u) q;
    RETURN lks;
END $$;

-- Rule 7, settling: each hold of the lease (in the order taken), what it
-- held and what it charges, its counter read as of now; TGOVF if usage plus
-- the charge (and an op's delta on that counter) would pass 2^64 - 1.
-- j: the op naming the same counter; ex: the counter exists.
CREATE OR REPLACE FUNCTION __SCHEMA__.settle_charges(b jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    ls jsonb := b->'lease';
    ops jsonb := b->'ops';
    now_ms bigint := (b->>'now')::bigint;
    charges jsonb := '[]';
    h record;
    c __SCHEMA__.ctr;
    o jsonb;
    held numeric;
    used numeric;
    charged numeric;
    also numeric;
    j int;
BEGIN
    FOR h IN SELECT x.*, t.used AS tused, t.period_start_ms, t.period_end_ms,
            t.bucket_ms, t.head, t.tail, t.slots, t.scope_kind IS NOT NULL AS tex
        FROM __SCHEMA__.holds x
        LEFT JOIN LATERAL (SELECT * FROM __SCHEMA__.counters y
            WHERE y.scope_kind = x.scope_kind AND y.scope_id = x.scope_id
              AND y.meter = x.meter AND y."window" = x."window" OFFSET 0) t ON true
        WHERE x.lease_id = ls->>'id' ORDER BY x.seq
    LOOP
        held := CASE WHEN h.tex THEN h.amount ELSE 0 END;
        used := 0;
        IF h.tex THEN
            c := __SCHEMA__.load(h."window", h.tused, h.period_start_ms,
                h.period_end_ms, h.bucket_ms, h.head, h.tail, h.slots, true);
            c := __SCHEMA__.roll(c, __SCHEMA__.win_period(h."window"),
                __SCHEMA__.win_off(h."window"), now_ms);
            used := c.used;
        END IF;
        charged := CASE WHEN h."window" = 'concurrent' THEN 0
            ELSE ceil(held * (ls->>'num')::numeric / (ls->>'den')::numeric) END;
        also := 0;
        j := NULL;
        FOR i IN 1..jsonb_array_length(ops) LOOP
            o := ops->(i - 1);
            IF o->>'k' = h.scope_kind AND o->>'s' = h.scope_id AND o->>'m' = h.meter
                AND o->>'w' = h."window" THEN
                also := (o->>'d')::numeric;
                j := i;
            END IF;
        END LOOP;
        IF used + charged + also > 18446744073709551615 THEN
            RAISE EXCEPTION USING ERRCODE = 'TGOVF', MESSAGE = h.meter;
        END IF;
        charges := charges || jsonb_build_array(jsonb_build_object('k', h.scope_kind,
            's', h.scope_id, 'm', h.meter, 'w', h."window", 'held', held,
            'charged', charged, 'j', j, 'ex', h.tex));
    END LOOP;
    RETURN charges;
END $$;

-- Rule 7, a lease action that applies: open the lease, move its expiry
-- (rolling its counters), or settle it (charging each hold, on the op's
-- counter in cs when an op names it). Returns cs and the settled holds.
CREATE OR REPLACE FUNCTION __SCHEMA__.lease_writes(b jsonb, charges jsonb,
    INOUT cs __SCHEMA__.ctr[], OUT settled jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    ls jsonb := b->'lease';
    now_ms bigint := (b->>'now')::bigint;
    act text := b->'lease'->>'a';
    o jsonb;
    c __SCHEMA__.ctr;
    j int;
BEGIN
    settled := '[]';
    IF act = 'open' THEN
        INSERT INTO __SCHEMA__.leases (id, owner_kind, owner_id, opened_ms, expires_ms,
            deadline_ms)
        VALUES (ls->>'id', ls->>'ok', ls->>'os', now_ms, (ls->>'exp')::bigint,
            (ls->>'dl')::bigint);
    ELSIF act = 'renew' THEN
        PERFORM __SCHEMA__.roll_holds(ls->>'id', now_ms);
        UPDATE __SCHEMA__.leases SET expires_ms = (ls->>'exp')::bigint WHERE id = ls->>'id';
    ELSIF act = 'settle' THEN
        FOR i IN 0..jsonb_array_length(charges) - 1 LOOP
            o := charges->i;
            j := (o->>'j')::int;
            IF j IS NOT NULL THEN
                c := __SCHEMA__.add(cs[j], (o->>'charged')::numeric);
                c.held := c.held - (o->>'held')::numeric;
                cs[j] := c;
            ELSIF (o->>'ex')::boolean THEN
                PERFORM __SCHEMA__.charge(o->>'k', o->>'s', o->>'m', o->>'w',
                    (o->>'charged')::numeric, now_ms);
            END IF;
            settled := settled || jsonb_build_array(jsonb_build_array(o->>'k', o->>'s',
                o->>'m', o->>'w', o->'held', o->'charged'));
        END LOOP;
        DELETE FROM __SCHEMA__.holds WHERE lease_id = ls->>'id';
        UPDATE __SCHEMA__.leases SET settled = true WHERE id = ls->>'id';
    END IF;
END $$;

-- Rule 7, open or grow: add delta to the lease's hold on op o's counter
-- (a new hold goes last in the lease's order).
CREATE OR REPLACE FUNCTION __SCHEMA__.hold(lease text, o jsonb, delta numeric)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE __SCHEMA__.holds SET amount = amount + delta
    WHERE lease_id = lease AND scope_kind = o->>'k' AND scope_id = o->>'s'
      AND meter = o->>'m' AND "window" = o->>'w';
    IF NOT FOUND THEN
        INSERT INTO __SCHEMA__.holds
        SELECT lease, coalesce(max(seq), 0) + 1, o->>'k', o->>'s', o->>'m', o->>'w', delta
        FROM __SCHEMA__.holds WHERE lease_id = lease;
    END IF;
END $$;

-- Rule 9: each listed scope's cooldown end if it runs past now_ms (else
-- null), and whether none does.
CREATE OR REPLACE FUNCTION __SCHEMA__.cooldowns_at(cds jsonb, now_ms bigint,
    OUT cool boolean, OUT cooling jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    cool := true;
    cooling := '[]';
    FOR r IN SELECT t.until_ms FROM jsonb_array_elements(cds) WITH ORDINALITY AS q(e, i)
        LEFT JOIN LATERAL (SELECT x.until_ms FROM __SCHEMA__.cooldowns x
            WHERE x.scope_kind = q.e->>'k' AND x.scope_id = q.e->>'s' OFFSET 0) t ON true
        ORDER BY q.i
    LOOP
        IF r.until_ms > now_ms THEN
            cool := false;
            cooling := cooling || to_jsonb(r.until_ms);
        ELSE
            cooling := cooling || 'null'::jsonb;
        END IF;
    END LOOP;
END $$;

-- Rule 9, a batch that applies: start (or lengthen) the listed cooldowns;
-- returns cooling with each started one's end.
CREATE OR REPLACE FUNCTION __SCHEMA__.cooldowns_start(cds jsonb, now_ms bigint,
    cooling jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    o jsonb;
    until bigint;
BEGIN
    FOR i IN 0..jsonb_array_length(cds) - 1 LOOP
        o := cds->i;
        IF o->>'u' IS NOT NULL THEN
            INSERT INTO __SCHEMA__.cooldowns AS t VALUES (o->>'k', o->>'s', (o->>'u')::bigint)
            ON CONFLICT (scope_kind, scope_id) DO UPDATE
                SET until_ms = greatest(t.until_ms, excluded.until_ms)
            RETURNING t.until_ms INTO until;
            IF until > now_ms THEN
                cooling := jsonb_set(cooling, ARRAY[i::text], to_jsonb(until));
            END IF;
        END IF;
    END LOOP;
    RETURN cooling;
END $$;

-- Apply one batch (contract rules 1-9) and answer it as jsonb:
-- {"a": applied, "c": [state per op], "s": [settled holds], "cd": [cooldown
-- ends], "r": replayed_at}. A refusal of bad input raises SQLSTATE TGxxx
-- (the whole call rolls back: nothing changed).
--
-- Locks: transaction-scoped advisory locks, taken in a fixed order before
-- anything is read: the event id, then the lease id, then every scope the
-- batch names (ops, cooldowns, the lease's holds) in ascending order.
-- Every batch that reads or writes a scope's counters, holds or cooldown
-- holds that scope's lock until it commits, and under READ COMMITTED each
-- statement after the lock reads a snapshot taken after it: so batches that
-- share a scope run one after the other, each seeing the other's writes.
CREATE OR REPLACE FUNCTION __SCHEMA__.apply(b jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    now_ms bigint := (b->>'now')::bigint;
    md text := b->>'mode';
    ops jsonb := b->'ops';
    nops int := jsonb_array_length(b->'ops');
    ls jsonb := b->'lease';
    cds jsonb := b->'cd';
    act text := b->'lease'->>'a';
    holding boolean := coalesce(b->'lease'->>'a' IN ('open', 'grow'), false);
    lks jsonb := b->'lk';
    cs __SCHEMA__.ctr[] := '{}';
    c __SCHEMA__.ctr;
    o jsonb;
    r record;
    v text;
    anydirty boolean := false;
    all_fit boolean := true;
    cool boolean := true;
    applied boolean;
    cooling jsonb := '[]';
    states jsonb := '[]';
    settled jsonb := '[]';
    charges jsonb := '[]';
    delta numeric;
    mx numeric;
    target numeric;
    ans jsonb;
BEGIN
    -- The ledger first (rule 8): a replay changes nothing.
    IF b->'event' IS NOT NULL THEN
        ans := __SCHEMA__.ledger(b);
        IF ans IS NOT NULL THEN
            RETURN ans;
        END IF;
    END IF;
    -- Then the lease (rule 7), whose holds' scopes are locked too.
    IF ls IS NOT NULL THEN
        lks := __SCHEMA__.lease_check(b, lks);
    END IF;
    -- Every scope named, locked in ascending (bytewise) order of "kind:id".
    FOR i IN 0..jsonb_array_length(lks) - 1 LOOP
        v := pg_advisory_xact_lock(hashtextextended((b->>'ns') || '|s|' || (lks->>i), 0))::text;
    END LOOP;

    -- Phase 1: read everything as of now (rolled in memory only) and decide.
    IF act = 'settle' THEN
        charges := __SCHEMA__.settle_charges(b);
    END IF;
    -- Each op's counter and live holds: one primary-key probe per op
    -- (OFFSET 0 keeps the planner from joining over the whole table).
    FOR r IN SELECT q.e, ROW(t.scope_kind IS NOT NULL, q.e->>'t', coalesce(t.used, 0),
                coalesce(hs.live, 0), t.period_start_ms, t.period_end_ms,
                (q.e->>'bw')::bigint, (q.e->>'n')::int, t.head, t.tail, t.slots, false,
                coalesce(hs.expired, false))::__SCHEMA__.ctr AS c
        FROM jsonb_array_elements(ops) WITH ORDINALITY AS q(e, i)
        LEFT JOIN LATERAL (SELECT * FROM __SCHEMA__.counters x WHERE x.scope_kind = q.e->>'k'
            AND x.scope_id = q.e->>'s' AND x.meter = q.e->>'m' AND x."window" = q.e->>'w'
            OFFSET 0) t ON true
        LEFT JOIN LATERAL (SELECT
                sum(x.amount) FILTER (WHERE l.expires_ms > now_ms AND NOT l.settled) AS live,
                bool_or(l.expires_ms <= now_ms) AS expired
            FROM __SCHEMA__.holds x JOIN __SCHEMA__.leases l ON l.id = x.lease_id
            WHERE x.scope_kind = q.e->>'k' AND x.scope_id = q.e->>'s'
              AND x.meter = q.e->>'m' AND x."window" = q.e->>'w' AND x.amount > 0) hs
            ON t.scope_kind IS NOT NULL
        ORDER BY q.i
    LOOP
        o := r.e;
        c := __SCHEMA__.roll(r.c, o->>'p', (o->>'o')::int, now_ms);
        delta := (o->>'d')::numeric;
        mx := (o->>'x')::numeric;
        -- Rule 4: past 2^64 - 1 an error where the delta would be added anyway.
        target := CASE WHEN holding THEN c.held ELSE c.used END;
        IF target + delta > 18446744073709551615 AND (md = 'f' OR mx IS NULL) THEN
            RAISE EXCEPTION USING ERRCODE = 'TGOVF', MESSAGE = o->>'m';
        END IF;
        all_fit := all_fit AND (delta = 0 OR mx IS NULL OR c.used + c.held + delta <= mx);
        cs := cs || c;
    END LOOP;
    IF jsonb_array_length(cds) > 0 THEN
        SELECT * INTO cool, cooling FROM __SCHEMA__.cooldowns_at(cds, now_ms);
    END IF;
    applied := CASE md WHEN 'c' THEN false WHEN 'w' THEN all_fit AND cool ELSE true END;

    -- Phase 2: apply the whole batch, or nothing.
    IF applied THEN
        IF ls IS NOT NULL THEN
            SELECT * INTO cs, settled FROM __SCHEMA__.lease_writes(b, charges, cs);
        END IF;
        FOR i IN 1..nops LOOP
            o := ops->(i - 1);
            c := cs[i];
            delta := (o->>'d')::numeric;
            IF NOT holding THEN
                c := __SCHEMA__.add(c, delta);
            ELSIF delta > 0 THEN
                c.ex := true;
                c.dirty := true;
                c.held := c.held + delta;
                PERFORM __SCHEMA__.hold(ls->>'id', o, delta);
            END IF;
            IF c.ex AND c.xh THEN
                PERFORM __SCHEMA__.drop_expired(o->>'k', o->>'s', o->>'m', o->>'w', now_ms);
            END IF;
            anydirty := anydirty OR (c.ex AND c.dirty);
            cs[i] := c;
        END LOOP;
        -- Every counter the batch changed, in one statement.
        IF anydirty THEN
            INSERT INTO __SCHEMA__.counters AS t (scope_kind, scope_id, meter, "window", used,
                period_start_ms, period_end_ms, bucket_ms, head, tail, slots, updated_ms)
            SELECT q.e->>'k', q.e->>'s', q.e->>'m', q.e->>'w', (cs[q.i]).used,
                (cs[q.i]).ps, (cs[q.i]).pe,
                CASE WHEN (cs[q.i]).kind = 'R' THEN (cs[q.i]).bw END, (cs[q.i]).head,
                (cs[q.i]).tail, (cs[q.i]).slots, now_ms
            FROM jsonb_array_elements(ops) WITH ORDINALITY AS q(e, i)
            WHERE (cs[q.i]).ex AND (cs[q.i]).dirty
            ON CONFLICT (scope_kind, scope_id, meter, "window") DO UPDATE SET
                used = excluded.used, period_start_ms = excluded.period_start_ms,
                period_end_ms = excluded.period_end_ms, head = excluded.head,
                tail = excluded.tail, slots = excluded.slots,
                updated_ms = excluded.updated_ms;
        END IF;
        IF jsonb_array_length(cds) > 0 THEN
            cooling := __SCHEMA__.cooldowns_start(cds, now_ms, cooling);
        END IF;
    END IF;

    -- Phase 3: report, and remember an applied event.
    IF nops > 0 THEN
        SELECT jsonb_agg(__SCHEMA__.state(cs[q.i], now_ms, (q.e->>'sp')::bigint,
                CASE WHEN applied THEN 0 ELSE (q.e->>'d')::numeric END,
                (q.e->>'x')::numeric) ORDER BY q.i) INTO states
        FROM jsonb_array_elements(ops) WITH ORDINALITY AS q(e, i);
    END IF;
    ans := jsonb_build_object('a', applied, 'c', states, 's', settled, 'cd', cooling);
    IF applied AND b->'event' IS NOT NULL THEN
        INSERT INTO __SCHEMA__.events AS t
        VALUES (b->'event'->>'id', (b->>'efp')::numeric, now_ms, ans)
        ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint,
            at_ms = excluded.at_ms, answer = excluded.answer;
    END IF;
    RETURN ans;
END $$;
