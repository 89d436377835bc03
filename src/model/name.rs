//! [`Name`]: a meter or currency name from the catalog, interned.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::OnceLock;

use parking_lot::Mutex;
use serde::{Serialize, Serializer};

/// A meter id or a currency code as a [`Decision`](crate::Decision) or a
/// [`UsageReport`](crate::UsageReport) names it: a copyable handle to a
/// string interned when a [`Catalog`](crate::Catalog) is built.
///
/// Reads like a `&str` (it derefs to one, compares equal to `str`, `&str`
/// and `String`, and displays as the string), but copying or dropping it
/// touches no reference count: a decision made on one thread never writes a
/// cache line that another thread's decision on another subject also
/// writes, which a shared `Arc<str>` per meter did.
///
/// Only names from a catalog are interned (meter ids and currencies, never
/// subject ids, event ids or other request data), each distinct string once
/// for the life of the process: loading a catalog again with the same names
/// adds nothing.
#[derive(Clone, Copy)]
pub struct Name(&'static str);

impl Name {
    /// The interned copy of `s`, made on first use.
    pub(crate) fn intern(s: &str) -> Self {
        static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut names = NAMES.get_or_init(Default::default).lock();
        if let Some(&known) = names.get(s) {
            return Self(known);
        }
        let leaked: &'static str = Box::leak(Box::from(s));
        names.insert(leaked);
        Self(leaked)
    }

    /// The interned name `s`, for a store or a test that builds a
    /// [`CounterOp`](crate::store::CounterOp) itself: the name a catalog
    /// with the meter `s` uses, so the two compare equal by pointer.
    ///
    /// For catalog names only (meter ids, currencies): an interned name
    /// lives for the rest of the process, so a name made from request data
    /// (subject ids, event ids) would grow memory without bound. Interning
    /// takes a global lock; build names once, not per call.
    pub fn new(s: &str) -> Self {
        Self::intern(s)
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.0
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        // Interned: equal strings are one allocation.
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so `Borrow<str>` lookups agree.
        self.0.hash(state);
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(other.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.0 == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl From<Name> for String {
    fn from(name: Name) -> Self {
        name.0.to_owned()
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Name;

    #[test]
    fn equal_strings_intern_to_one_name_and_read_as_the_string() {
        let owned = String::from("llm_tokens_input");
        let a = Name::intern("llm_tokens_input");
        let b = Name::intern(&owned);
        assert_eq!(a, b);
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(a, "llm_tokens_input");
        assert_eq!(a.to_string(), owned);
        assert_ne!(a, Name::intern("llm_tokens_output"));
        assert_eq!(format!("{a:?}"), "\"llm_tokens_input\"");
    }
}
