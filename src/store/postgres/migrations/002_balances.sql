-- tollgate PostgreSQL store, schema version 2: prepaid balances (contract
-- rule 10). Runs after 001_schema.sql (a store at version 1 upgrades in
-- place: three new tables, and `apply`, `lease_check` replaced).
-- `__SCHEMA__` is replaced by the store's schema (quoted). Amounts are u64
-- kept as numeric(20,0); instants are bigint Unix milliseconds.

-- A balance: one row per (scope, money meter), made by the first batch
-- that applies to it and kept as long as the schema (it is a record).
-- `debt`: what consumption took past the grants, within an overdraft.
-- `seen_ms`: the latest `now` of a batch that applied to it; grants are
-- read at the later of `now` and this, so a clock stepping back never
-- brings an expired grant back.
CREATE TABLE IF NOT EXISTS __SCHEMA__.balances (
    scope_kind text NOT NULL,            -- 'subject' | 'pool'
    scope_id text NOT NULL,
    meter text NOT NULL,
    debt numeric(20,0) NOT NULL DEFAULT 0,
    seen_ms bigint NOT NULL,
    PRIMARY KEY (scope_kind, scope_id, meter)
);

-- A balance's grants (top-ups), spent and expired ones too: the record a
-- payment id (`id`) is checked against. Live while effective_ms <= t and
-- (expires_ms IS NULL OR t < expires_ms). Consumed in the order of
-- `grants_order`: priority, expiry (none last), start, id bytes (COLLATE
-- "C": byte order whatever the database's locale).
CREATE TABLE IF NOT EXISTS __SCHEMA__.grants (
    scope_kind text NOT NULL,
    scope_id text NOT NULL,
    meter text NOT NULL,
    id text NOT NULL,
    amount numeric(20,0) NOT NULL CHECK (amount > 0),
    spent numeric(20,0) NOT NULL CHECK (spent >= 0 AND spent <= amount),
    effective_ms bigint NOT NULL,
    expires_ms bigint CHECK (expires_ms > effective_ms),
    priority bigint NOT NULL,            -- u32
    granted_ms bigint NOT NULL,          -- the granting batch's now
    PRIMARY KEY (scope_kind, scope_id, meter, id),
    FOREIGN KEY (scope_kind, scope_id, meter)
        REFERENCES __SCHEMA__.balances (scope_kind, scope_id, meter) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS grants_order ON __SCHEMA__.grants (scope_kind, scope_id, meter,
    priority, expires_ms ASC NULLS LAST, effective_ms, id COLLATE "C");

-- A lease's hold on a balance (a lease holds on at most one): counts while
-- the lease is live (it moves with the lease's expiry); zeroed by a batch
-- that applies to the balance at or after the expiry, removed when the
-- lease settles, and gone with the lease row (`reclaim`).
CREATE TABLE IF NOT EXISTS __SCHEMA__.balance_holds (
    lease_id text PRIMARY KEY REFERENCES __SCHEMA__.leases (id) ON DELETE CASCADE,
    scope_kind text NOT NULL,
    scope_id text NOT NULL,
    meter text NOT NULL,
    amount numeric(20,0) NOT NULL
);
CREATE INDEX IF NOT EXISTS balance_holds_balance
    ON __SCHEMA__.balance_holds (scope_kind, scope_id, meter);

-- Rule 7 (as in version 1), and the scope of the balance the lease holds
-- on locked too: lock the batch's lease and check it can take the action
-- (TGINV, TGUNK, TGSET, TGEXP otherwise). Returns the scopes to lock: lks
-- with the scopes of the lease's holds, sorted bytewise and distinct.
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
        WHERE x.lease_id = ls->>'id'
        UNION ALL SELECT y.scope_kind || ':' || y.scope_id FROM __SCHEMA__.balance_holds y
        WHERE y.lease_id = ls->>'id') u) q;
    RETURN lks;
END $$;

-- A balance read at now_ms: its debt and seen time (0, 0 when it does not
-- exist), what its live grants have left (read at the later of now and
-- seen), its live holds, and all its holds not yet dropped.
CREATE OR REPLACE FUNCTION __SCHEMA__.bal_read(sk text, sid text, m text, now_ms bigint,
    OUT r_debt numeric, OUT r_seen bigint, OUT r_rem numeric, OUT r_held numeric,
    OUT r_holds numeric)
LANGUAGE plpgsql AS $$
DECLARE
    t bigint;
BEGIN
    SELECT x.debt, x.seen_ms INTO r_debt, r_seen FROM __SCHEMA__.balances x
    WHERE x.scope_kind = sk AND x.scope_id = sid AND x.meter = m;
    IF NOT FOUND THEN
        r_debt := 0;
        r_seen := 0;
    END IF;
    t := greatest(now_ms, r_seen);
    SELECT coalesce(sum(g.amount - g.spent), 0) INTO r_rem FROM __SCHEMA__.grants g
    WHERE g.scope_kind = sk AND g.scope_id = sid AND g.meter = m
      AND g.effective_ms <= t AND (g.expires_ms IS NULL OR t < g.expires_ms);
    SELECT coalesce(sum(h.amount) FILTER (WHERE l.expires_ms > now_ms), 0),
        coalesce(sum(h.amount), 0) INTO r_held, r_holds
    FROM __SCHEMA__.balance_holds h JOIN __SCHEMA__.leases l ON l.id = h.lease_id
    WHERE h.scope_kind = sk AND h.scope_id = sid AND h.meter = m;
END $$;

-- The balance as the answer reports it: {"rem", "held", "debt", "fits",
-- "unc", "g": [[id, amount, spent, effective, expires, priority, granted]]}
-- with every grant not expired at t that has something left, in
-- consumption order (see BalanceState).
CREATE OR REPLACE FUNCTION __SCHEMA__.bal_state(sk text, sid text, m text, now_ms bigint,
    fits boolean, unc numeric) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    t bigint;
    gs jsonb;
BEGIN
    SELECT * INTO r FROM __SCHEMA__.bal_read(sk, sid, m, now_ms);
    t := greatest(now_ms, r.r_seen);
    SELECT coalesce(jsonb_agg(jsonb_build_array(g.id, g.amount, g.spent, g.effective_ms,
            g.expires_ms, g.priority, g.granted_ms)
        ORDER BY g.priority, g.expires_ms ASC NULLS LAST, g.effective_ms,
            g.id COLLATE "C"), '[]') INTO gs
    FROM __SCHEMA__.grants g
    WHERE g.scope_kind = sk AND g.scope_id = sid AND g.meter = m
      AND g.amount > g.spent AND (g.expires_ms IS NULL OR t < g.expires_ms);
    RETURN jsonb_build_object('rem', r.r_rem, 'held', r.r_held, 'debt', r.r_debt,
        'fits', fits, 'unc', unc, 'g', gs);
END $$;

-- Rule 10, phase 1, on the batch's balance (bk, bs, bm): a grant's replay
-- (returns its granted_ms) or conflict (TGGRT), grants past 2^64 - 1 or
-- holds past it (TGOVF); else whether the debit fits (fits).
CREATE OR REPLACE FUNCTION __SCHEMA__.bal_check(b jsonb, bk text, bs text, bm text,
    OUT fits boolean, OUT replayed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    bal jsonb := b->'bal';
    now_ms bigint := (b->>'now')::bigint;
    holding boolean := coalesce(b->'lease'->>'a' IN ('open', 'grow'), false);
    amt numeric := (bal->>'n')::numeric;
    g record;
    r record;
    total numeric;
BEGIN
    fits := true;
    IF bal->>'a' = 'g' THEN
        SELECT * INTO g FROM __SCHEMA__.grants x WHERE x.scope_kind = bk
            AND x.scope_id = bs AND x.meter = bm AND x.id = bal->>'id';
        IF FOUND THEN
            IF g.amount = amt AND g.effective_ms = (bal->>'eff')::bigint
                AND g.expires_ms IS NOT DISTINCT FROM (bal->>'exp')::bigint
                AND g.priority = (bal->>'pr')::bigint THEN
                replayed := g.granted_ms;
                RETURN;
            END IF;
            RAISE EXCEPTION USING ERRCODE = 'TGGRT', MESSAGE = bal->>'id';
        END IF;
        SELECT coalesce(sum(x.amount), 0) INTO total FROM __SCHEMA__.grants x
        WHERE x.scope_kind = bk AND x.scope_id = bs AND x.meter = bm;
        IF total + amt > 18446744073709551615 THEN
            RAISE EXCEPTION USING ERRCODE = 'TGOVF', MESSAGE = bm;
        END IF;
        RETURN;
    END IF;
    SELECT * INTO r FROM __SCHEMA__.bal_read(bk, bs, bm, now_ms);
    IF holding AND r.r_holds + amt > 18446744073709551615 THEN
        RAISE EXCEPTION USING ERRCODE = 'TGOVF', MESSAGE = bm;
    END IF;
    IF b->>'mode' <> 'f' THEN
        fits := amt = 0 OR amt <= r.r_rem - r.r_held - r.r_debt;
    END IF;
END $$;

-- Consume n from a balance (made, and touched, by bal_apply): its live
-- grants in order, then debt up to od. Returns what was left uncovered.
CREATE OR REPLACE FUNCTION __SCHEMA__.bal_consume(sk text, sid text, m text, n numeric,
    od numeric, now_ms bigint) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    t bigint;
    d numeric;
    lft numeric := n;
    take numeric;
    owed numeric;
    g record;
BEGIN
    IF n = 0 THEN
        RETURN 0;
    END IF;
    SELECT x.debt, greatest(now_ms, x.seen_ms) INTO d, t FROM __SCHEMA__.balances x
    WHERE x.scope_kind = sk AND x.scope_id = sid AND x.meter = m;
    FOR g IN SELECT x.id, x.amount - x.spent AS rest FROM __SCHEMA__.grants x
        WHERE x.scope_kind = sk AND x.scope_id = sid AND x.meter = m
          AND x.effective_ms <= t AND (x.expires_ms IS NULL OR t < x.expires_ms)
          AND x.amount > x.spent
        ORDER BY x.priority, x.expires_ms ASC NULLS LAST, x.effective_ms, x.id COLLATE "C"
    LOOP
        EXIT WHEN lft = 0;
        take := least(lft, g.rest);
        UPDATE __SCHEMA__.grants x SET spent = x.spent + take
        WHERE x.scope_kind = sk AND x.scope_id = sid AND x.meter = m AND x.id = g.id;
        lft := lft - take;
    END LOOP;
    owed := least(lft, greatest(od - d, 0));
    IF owed > 0 THEN
        UPDATE __SCHEMA__.balances x SET debt = x.debt + owed
        WHERE x.scope_kind = sk AND x.scope_id = sid AND x.meter = m;
    END IF;
    RETURN lft - owed;
END $$;

-- Rule 10, phase 2, for a batch that applies, on its target balance (the
-- one it names, or the one its lease holds on): make the row if new, move
-- its seen time, zero the holds of leases ended by now, then add the grant,
-- consume the debit, hold it (open, grow), or settle the lease's hold
-- (consume keep of it, then the debit). Runs after lease_writes. Returns
-- what was left uncovered.
CREATE OR REPLACE FUNCTION __SCHEMA__.bal_apply(b jsonb, bk text, bs text, bm text)
RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    bal jsonb := b->'bal';
    ls jsonb := b->'lease';
    act text := b->'lease'->>'a';
    now_ms bigint := (b->>'now')::bigint;
    amt numeric := 0;
    od numeric := 0;
    d numeric;
    t bigint;
    repaid numeric;
    held numeric;
    kept numeric;
    unc numeric;
BEGIN
    INSERT INTO __SCHEMA__.balances AS x (scope_kind, scope_id, meter, debt, seen_ms)
    VALUES (bk, bs, bm, 0, greatest(0, now_ms))
    ON CONFLICT (scope_kind, scope_id, meter) DO UPDATE
        SET seen_ms = greatest(x.seen_ms, excluded.seen_ms);
    UPDATE __SCHEMA__.balance_holds h SET amount = 0 FROM __SCHEMA__.leases l
    WHERE h.scope_kind = bk AND h.scope_id = bs AND h.meter = bm AND h.amount > 0
      AND l.id = h.lease_id AND l.expires_ms <= now_ms;
    IF bal->>'a' = 'g' THEN
        amt := (bal->>'n')::numeric;
        -- Only a live grant (at the balance's time, the upsert above) pays
        -- the debt off; one not yet effective or already expired leaves it.
        SELECT x.debt, x.seen_ms INTO d, t FROM __SCHEMA__.balances x
        WHERE x.scope_kind = bk AND x.scope_id = bs AND x.meter = bm;
        IF (bal->>'eff')::bigint <= t
           AND ((bal->>'exp') IS NULL OR t < (bal->>'exp')::bigint) THEN
            repaid := least(amt, d);
        ELSE
            repaid := 0;
        END IF;
        IF repaid > 0 THEN
            UPDATE __SCHEMA__.balances x SET debt = x.debt - repaid
            WHERE x.scope_kind = bk AND x.scope_id = bs AND x.meter = bm;
        END IF;
        INSERT INTO __SCHEMA__.grants (scope_kind, scope_id, meter, id, amount, spent,
            effective_ms, expires_ms, priority, granted_ms)
        VALUES (bk, bs, bm, bal->>'id', amt, repaid, (bal->>'eff')::bigint,
            (bal->>'exp')::bigint, (bal->>'pr')::bigint, now_ms);
        RETURN 0;
    END IF;
    IF bal->>'a' = 'd' THEN
        amt := (bal->>'n')::numeric;
        od := (bal->>'od')::numeric;
    END IF;
    IF ls IS NULL THEN
        RETURN __SCHEMA__.bal_consume(bk, bs, bm, amt, od, now_ms);
    ELSIF act IN ('open', 'grow') THEN
        IF amt > 0 THEN
            INSERT INTO __SCHEMA__.balance_holds AS x VALUES (ls->>'id', bk, bs, bm, amt)
            ON CONFLICT (lease_id) DO UPDATE SET amount = x.amount + excluded.amount;
        END IF;
    ELSIF act = 'settle' THEN
        DELETE FROM __SCHEMA__.balance_holds x WHERE x.lease_id = ls->>'id'
        RETURNING x.amount INTO held;
        held := coalesce(held, 0);
        -- keep.ceil_of(held), exactly: integer division rounding up.
        kept := div(held * (ls->>'num')::numeric + (ls->>'den')::numeric - 1,
            (ls->>'den')::numeric);
        unc := __SCHEMA__.bal_consume(bk, bs, bm, kept, od, now_ms)
            + __SCHEMA__.bal_consume(bk, bs, bm, amt, od, now_ms);
        RETURN least(unc, 18446744073709551615);
    END IF;
    -- A renewal: the hold moves with its lease's expiry.
    RETURN 0;
END $$;

-- Apply one batch (contract rules 1-10) and answer it as jsonb:
-- {"a": applied, "c": [state per op], "s": [settled holds], "cd": [cooldown
-- ends], "r": replayed_at, "b": balance (see bal_state)}. A refusal of bad
-- input raises SQLSTATE TGxxx (the whole call rolls back: nothing changed).
--
-- Locks: transaction-scoped advisory locks, taken in a fixed order before
-- anything is read: the event id, then the lease id, then every scope the
-- batch names (ops, cooldowns, its balance, the lease's holds and the
-- balance it holds on) in ascending order. Every batch that reads or writes
-- a scope's counters, holds, cooldown or balances holds that scope's lock
-- until it commits, and under READ COMMITTED each statement after the lock
-- reads a snapshot taken after it: so batches that share a scope run one
-- after the other, each seeing the other's writes.
CREATE OR REPLACE FUNCTION __SCHEMA__.apply(b jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    now_ms bigint := (b->>'now')::bigint;
    md text := b->>'mode';
    ops jsonb := b->'ops';
    nops int := jsonb_array_length(b->'ops');
    ls jsonb := b->'lease';
    cds jsonb := b->'cd';
    bal jsonb := b->'bal';
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
    bk text;
    bs text;
    bm text;
    bfits boolean := true;
    breplayed bigint;
    unc numeric := 0;
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

    -- The balance the batch acts on (rule 10): the one it names, else the
    -- one its lease holds on; naming another than the lease's is TGINV.
    IF ls IS NOT NULL AND act <> 'open' THEN
        SELECT x.scope_kind, x.scope_id, x.meter INTO bk, bs, bm
        FROM __SCHEMA__.balance_holds x WHERE x.lease_id = ls->>'id';
    END IF;
    IF bal IS NOT NULL THEN
        IF bk IS NOT NULL AND (bk <> bal->>'k' OR bs <> bal->>'s' OR bm <> bal->>'m') THEN
            RAISE EXCEPTION USING ERRCODE = 'TGINV',
                MESSAGE = 'a lease holds on one balance: the batch names another';
        END IF;
        bk := bal->>'k';
        bs := bal->>'s';
        bm := bal->>'m';
    END IF;

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
    -- The balance last: a debit's fit, a grant's replay or conflict.
    IF bal IS NOT NULL THEN
        SELECT x.fits, x.replayed INTO bfits, breplayed
        FROM __SCHEMA__.bal_check(b, bk, bs, bm) x;
        IF breplayed IS NOT NULL THEN
            -- A grant already made: nothing changes.
            RETURN jsonb_build_object('a', true, 'c', '[]'::jsonb, 's', '[]'::jsonb,
                'cd', '[]'::jsonb, 'r', breplayed,
                'b', __SCHEMA__.bal_state(bk, bs, bm, now_ms, true, 0));
        END IF;
    END IF;
    applied := CASE md WHEN 'c' THEN false WHEN 'w' THEN all_fit AND cool AND bfits
        ELSE true END;

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
        IF bk IS NOT NULL THEN
            unc := __SCHEMA__.bal_apply(b, bk, bs, bm);
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
    IF bal IS NOT NULL THEN
        ans := ans || jsonb_build_object('b',
            __SCHEMA__.bal_state(bk, bs, bm, now_ms, bfits, unc));
    END IF;
    IF applied AND b->'event' IS NOT NULL THEN
        INSERT INTO __SCHEMA__.events AS t
        VALUES (b->'event'->>'id', (b->>'efp')::numeric, now_ms, ans)
        ON CONFLICT (id) DO UPDATE SET fingerprint = excluded.fingerprint,
            at_ms = excluded.at_ms, answer = excluded.answer;
    END IF;
    RETURN ans;
END $$;
