//! The one error type. A refusal is a [`Decision`](crate::Decision), never an
//! error: `Err` means the input was bad or the store failed, and nothing changed.

use rust_decimal::Decimal;

/// Everything that can go wrong in tollgate. Each variant names the input
/// that caused it; when an engine call returns `Err`, no counter changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No allocation binds this subject to a plan.
    #[error("unknown subject `{subject}`")]
    UnknownSubject {
        /// The subject asked about.
        subject: String,
    },
    /// No plan with this id is in the catalog.
    #[error("unknown plan `{plan}`")]
    UnknownPlan {
        /// The plan named.
        plan: String,
    },
    /// No meter with this id is in the catalog.
    #[error("unknown meter `{meter}`")]
    UnknownMeter {
        /// The meter named.
        meter: String,
    },
    /// No pool (shared scope) with this id is in the catalog.
    #[error("unknown pool `{pool}`")]
    UnknownPool {
        /// The pool named.
        pool: String,
    },
    /// An amount below zero.
    #[error("negative amount {amount} for meter `{meter}`")]
    NegativeAmount {
        /// The meter the amount was for.
        meter: String,
        /// The amount given.
        amount: Decimal,
    },
    /// An amount, cost or counter that does not fit the integer it is kept in.
    #[error("amount overflows for meter `{meter}`")]
    Overflow {
        /// The meter whose amount or counter overflowed.
        meter: String,
    },
    /// Money given in a currency other than the meter's.
    #[error("meter `{meter}` counts {expected}, not {found}")]
    CurrencyMismatch {
        /// The money meter.
        meter: String,
        /// The meter's currency.
        expected: String,
        /// The currency given.
        found: String,
    },
    /// A count given for a money meter, or money for a count meter.
    #[error("meter `{meter}` is {expected}; the amount given was not")]
    WrongUnit {
        /// The meter.
        meter: String,
        /// What the meter counts: "money" or "a count".
        expected: &'static str,
    },
    /// Configuration refused at load. `field` is a path such as
    /// `plans[plan_free].limits[0].max`.
    #[error("invalid config at `{field}`: {reason}")]
    InvalidConfig {
        /// Where in the configuration the problem is.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A batch handed to a store breaks the store contract: a counter named
    /// twice, or an invalid window. The engine never builds one; a host
    /// calling a store directly can.
    #[error("invalid batch: {reason}")]
    InvalidBatch {
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed (a backend's connection, a poisoned state). Nothing is
    /// known to have changed.
    #[error("store failed: {message}")]
    Store {
        /// What the backend reported.
        message: String,
    },
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
