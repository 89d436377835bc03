//! Meters and their units, and the conversion between a meter's smallest
//! unit and its major unit.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Most decimal places a money meter may keep (10^12 minor units per major
/// unit still leaves room for 18 million major units in a `u64`).
pub const MAX_MONEY_SCALE: u32 = 12;

/// What a meter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Unit {
    /// Whole things: tokens, requests, jobs, messages.
    Count,
    /// Whole seconds of runtime.
    Seconds,
    /// Money in one currency, kept as an integer of `10^-scale` major units
    /// (scale 2 is cents; scale 6 is micro-dollars).
    Money {
        /// ISO 4217 code or any label; amounts in another currency are refused.
        currency: String,
        /// Decimal places kept, at most [`MAX_MONEY_SCALE`].
        scale: u32,
    },
}

/// A named quantity with a unit, such as `llm_tokens_input` or `cost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// The meter's id, unique in the catalog.
    pub id: String,
    /// What it counts.
    pub unit: Unit,
}

impl Meter {
    /// A meter of whole things.
    pub fn count(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Count,
        }
    }

    /// A meter of seconds.
    pub fn seconds(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Seconds,
        }
    }

    /// A money meter in `currency`, keeping `scale` decimal places.
    pub fn money(id: impl Into<String>, currency: impl Into<String>, scale: u32) -> Self {
        Self {
            id: id.into(),
            unit: Unit::Money {
                currency: currency.into(),
                scale,
            },
        }
    }

    /// Decimal places of the meter's smallest unit (0 for counts and seconds).
    pub fn scale(&self) -> u32 {
        match self.unit {
            Unit::Money { scale, .. } => scale,
            _ => 0,
        }
    }

    /// The currency of a money meter.
    pub fn currency(&self) -> Option<&str> {
        match &self.unit {
            Unit::Money { currency, .. } => Some(currency),
            _ => None,
        }
    }

    /// Convert an integer of the meter's smallest unit to a decimal of its
    /// major unit (for money: 1234 at scale 2 is 12.34). The scale is valid
    /// in any meter of a built [`Catalog`](crate::Catalog) (at most [`MAX_MONEY_SCALE`]).
    pub fn to_decimal(&self, minor: u64) -> Decimal {
        // scale <= MAX_MONEY_SCALE, within Decimal's 28.
        minor_to_decimal(minor, self.scale())
    }

    /// Convert a decimal amount to the meter's smallest unit, rounding any
    /// fraction **up** so a charge never rounds down to zero. `None` if it does
    /// not fit a `u64` or is negative.
    pub fn to_minor_ceil(&self, amount: Decimal) -> Option<u64> {
        if amount.is_zero() {
            return Some(0);
        }
        if amount.is_sign_negative() {
            return None;
        }
        // Integer arithmetic on the mantissa: Decimal multiplication may round
        // away trailing digits, and a rounded-away tail must still round up.
        let m = u128::try_from(amount.mantissa()).ok()?;
        let (have, want) = (amount.scale(), self.scale());
        let minor = if have <= want {
            m.checked_mul(10u128.checked_pow(want - have)?)?
        } else {
            let div = 10u128.checked_pow(have - want)?;
            m / div + u128::from(m % div != 0)
        };
        u64::try_from(minor).ok()
    }
}

/// `minor` smallest units of a unit with `scale` decimal places, in the
/// major unit (1234 at scale 2 is 12.34); a scale past `Decimal`'s (never
/// in a built catalog) is left at 0.
#[inline]
pub(super) fn minor_to_decimal(minor: u64, scale: u32) -> Decimal {
    let mut d = Decimal::from(minor);
    d.set_scale(scale).ok();
    d
}
