//! Leases: a reservation's id, and the exact share of a hold it keeps.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A reservation's lease id: 128 random bits, written as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseId(u128);

/// One word hashed, not two: the bits are random already, and a lease
/// table's SipHash then runs one compression round fewer per lookup.
impl std::hash::Hash for LeaseId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64((self.0 as u64) ^ ((self.0 >> 64) as u64));
    }
}

impl LeaseId {
    /// A fresh id, unique within a process, unique with overwhelming
    /// probability across processes, and unpredictable from earlier ids:
    /// the high half is a counter hashed under a key that std's randomly
    /// keyed hasher draws once per process, the low half a keyed bijection
    /// of the counter.
    pub fn random() -> Self {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        static KEY: OnceLock<(RandomState, u64)> = OnceLock::new();
        // The keys drawn once per process and one keyed hash per id, not a
        // fresh key pair, a clock read and two hashes: about 500
        // instructions a reservation.
        let (keys, k) = KEY.get_or_init(|| {
            let keys = RandomState::new();
            let k = keys.hash_one(u64::MAX);
            (keys, k)
        });
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut h = keys.build_hasher();
        h.write_u64(seq);
        Self((u128::from(h.finish()) << 64) | u128::from(mix(seq ^ k)))
    }

    /// The id with these bits.
    pub const fn from_u128(bits: u128) -> Self {
        Self(bits)
    }

    /// The id's bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl LeaseId {
    /// `prefix` then the id as its [`Display`](fmt::Display) writes it (32
    /// lowercase hex digits), in one exactly sized allocation: the async
    /// engine's event ids, made on every admit, without the formatter
    /// (`format!` cost ~1,500 instructions an admit, BENCHMARKS.md).
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn prefixed(self, prefix: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 32];
        for (i, d) in digits.iter_mut().enumerate() {
            *d = HEX[((self.0 >> ((31 - i) * 4)) & 0xf) as usize];
        }
        let mut s = String::with_capacity(prefix.len() + 32);
        s.push_str(prefix);
        // ASCII hex digits: always UTF-8.
        s.push_str(std::str::from_utf8(&digits).unwrap_or_default());
        s
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl FromStr for LeaseId {
    type Err = Error;
    /// Parse 32 hex digits.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::UnknownReservation { id: s.to_owned() });
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| Error::UnknownReservation { id: s.to_owned() })
    }
}

impl Serialize for LeaseId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LeaseId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// SplitMix64's finalizer: a bijection of `u64` that spreads every input
/// bit over the output.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A share in `[0, 1]` as an exact fraction: the part of a hold that a
/// settlement keeps as usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fraction {
    num: u64,
    den: u64,
}

impl Fraction {
    /// Nothing: `0/1`.
    pub const ZERO: Fraction = Fraction { num: 0, den: 1 };
    /// Everything: `1/1`.
    pub const ONE: Fraction = Fraction { num: 1, den: 1 };

    /// `num / den`, if `den > 0` and `num <= den`.
    pub const fn new(num: u64, den: u64) -> Option<Self> {
        if den == 0 || num > den {
            None
        } else {
            Some(Self { num, den })
        }
    }

    /// The numerator.
    pub const fn num(self) -> u64 {
        self.num
    }

    /// The denominator.
    pub const fn den(self) -> u64 {
        self.den
    }

    /// `ceil(amount × num / den)`, exact: a charge never rounds down.
    pub fn ceil_of(self, amount: u64) -> u64 {
        // Nothing and everything, the shares a commit and the default
        // refund policy use, without a 128-bit division.
        if self.num == 0 {
            return 0;
        }
        if self.num == self.den {
            return amount;
        }
        let p = u128::from(amount) * u128::from(self.num);
        let d = u128::from(self.den);
        // num <= den, so the result is at most `amount`.
        u64::try_from(p.div_ceil(d)).unwrap_or(amount)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixed_writes_what_display_writes() {
        for bits in [
            0u128,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let id = super::LeaseId::from_u128(bits);
            assert_eq!(id.prefixed("tollgate:"), format!("tollgate:{id}"));
        }
        let id = super::LeaseId::random();
        assert_eq!(id.prefixed(""), id.to_string());
    }

    use super::LeaseId;

    #[test]
    fn random_ids_are_distinct_in_both_halves_and_not_sequential() {
        let ids: Vec<u128> = (0..10_000).map(|_| LeaseId::random().as_u128()).collect();
        let all: std::collections::HashSet<u128> = ids.iter().copied().collect();
        let lows: std::collections::HashSet<u64> = ids.iter().map(|&i| i as u64).collect();
        let highs: std::collections::HashSet<u64> = ids.iter().map(|&i| (i >> 64) as u64).collect();
        assert_eq!(
            (all.len(), lows.len(), highs.len()),
            (10_000, 10_000, 10_000)
        );
        // Hashed, not counted: consecutive ids differ in about half their bits.
        let flips: u32 = ids.windows(2).map(|w| (w[0] ^ w[1]).count_ones()).sum();
        assert!(
            (54 * 9_999..74 * 9_999).contains(&flips),
            "{flips} bits flipped over 9,999 pairs"
        );
    }

    #[test]
    fn ceil_of_is_exact_at_nothing_everything_and_between() {
        use super::Fraction;
        assert_eq!(Fraction::ZERO.ceil_of(u64::MAX), 0);
        assert_eq!(Fraction::ONE.ceil_of(u64::MAX), u64::MAX);
        let third = Fraction::new(1, 3).expect("valid");
        assert_eq!(
            (third.ceil_of(3), third.ceil_of(4), third.ceil_of(0)),
            (1, 2, 0)
        );
        let all = Fraction::new(7, 7).expect("valid");
        assert_eq!(all.ceil_of(u64::MAX), u64::MAX);
        let none = Fraction::new(0, 9).expect("valid");
        assert_eq!(none.ceil_of(5), 0);
    }
}
