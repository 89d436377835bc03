//! One `#[test]` per check of the public conformance suite, for a store's
//! test file: `conformance_tests!();` after a `conformance_on(name, run)`
//! that makes fresh stores for `run` (under names and prefixes of its own)
//! and cleans up after it. The tests land in a module `conformance_suite`.

macro_rules! conformance_tests {
    () => {
        conformance_tests!(@each
            batches_are_all_or_nothing => "all",
            bad_batches_change_nothing => "bad",
            windows_roll_exactly => "windows",
            holds_count_and_settle => "holds",
            leases_expire_and_renew => "leases",
            events_apply_once => "events",
            cooldowns_block_until_they_end => "cooldowns",
            concurrent_batches_never_over_admit => "concurrent",
            clock_steps_back_free_nothing => "clock",
            balances_consume_grants_in_order => "balances",
            grants_are_idempotent => "grants",
            balance_holds_settle => "balance_holds",
            concurrent_debits_never_overdraw => "balance_threads",
            closed_periods_are_kept => "history",
        );
    };
    (@each $($check:ident => $name:literal),* $(,)?) => {
        mod conformance_suite {
            $(
                #[test]
                fn $check() {
                    super::conformance_on($name, |new| tollgate::conformance::$check(new));
                }
            )*
        }
    };
}
