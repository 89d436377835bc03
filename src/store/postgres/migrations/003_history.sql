-- tollgate PostgreSQL store, schema version 3: closed calendar periods
-- (contract rule 11). `__SCHEMA__` is replaced as in 001.

-- One row per calendar counter and closed period that held usage: the
-- counter's `used` when a batch rolled it past the period. A host can read
-- it as its usage rollup. `PostgresStore::reclaim` deletes rows more than
-- the store's `history_periods` periods old (and a few more: see
-- `reclaim`); nothing else does.
CREATE TABLE IF NOT EXISTS __SCHEMA__.counter_history (
    scope_kind text NOT NULL,
    scope_id text NOT NULL,
    meter text NOT NULL,
    "window" text NOT NULL,
    period_start_ms bigint NOT NULL,
    period_end_ms bigint NOT NULL,
    used numeric(20,0) NOT NULL,
    PRIMARY KEY (scope_kind, scope_id, meter, "window", period_start_ms)
);

-- Keep a calendar counter's total when a write moves it to another period
-- (a roll): in the same transaction as the batch that rolled it. A period
-- kept twice (a clock stepping back into it, usage counted again, then
-- rolled again) adds up: both were usage of that period.
CREATE OR REPLACE FUNCTION __SCHEMA__.keep_closed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO __SCHEMA__.counter_history AS h (scope_kind, scope_id, meter, "window",
        period_start_ms, period_end_ms, used)
    VALUES (OLD.scope_kind, OLD.scope_id, OLD.meter, OLD."window",
        OLD.period_start_ms, OLD.period_end_ms, OLD.used)
    ON CONFLICT (scope_kind, scope_id, meter, "window", period_start_ms)
    DO UPDATE SET used = h.used + excluded.used;
    RETURN NULL;
END $$;

-- Fires only on a roll that leaves usage behind: the WHEN clause is
-- evaluated without calling the function, so an ordinary write pays
-- nothing but the comparison.
DROP TRIGGER IF EXISTS keep_closed ON __SCHEMA__.counters;
CREATE TRIGGER keep_closed AFTER UPDATE ON __SCHEMA__.counters
    FOR EACH ROW
    WHEN (OLD.period_start_ms IS NOT NULL
          AND OLD.period_start_ms IS DISTINCT FROM NEW.period_start_ms
          AND OLD.used > 0)
    EXECUTE FUNCTION __SCHEMA__.keep_closed();
