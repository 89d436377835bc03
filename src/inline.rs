//! A small list kept inline, for per-call bookkeeping without allocation.

use std::fmt;

/// The engine's and memory store's per-call lists: `smallvec::SmallVec`
/// (issue 13: a kept crate), which leaves unused slots uninitialised where
/// [`Inline`] fills every one. [`Inline`] stays for `Request`, whose
/// lifetime must stay covariant (a `SmallVec` is invariant in its item).
pub(crate) type SmallList<T, const N: usize = 16> = smallvec::SmallVec<[T; N]>;

/// A list kept inline up to `N` items (16 by default) and on the heap past
/// that: a `Request`'s amounts, which allocate nothing for an ordinary call.
/// Unlike [`SmallList`] it is covariant in `T`, as `Request<'a>` must stay.
#[derive(Clone)]
pub(crate) struct Inline<T: Copy, const N: usize = 16> {
    len: usize,
    buf: [T; N],
    more: Vec<T>,
}

impl<T: Copy, const N: usize> Inline<T, N> {
    /// An empty list whose unused slots hold `fill` (never read), for item
    /// types without a `Default`.
    #[inline]
    pub(crate) fn filled(fill: T) -> Self {
        Self {
            len: 0,
            buf: [fill; N],
            more: Vec::new(),
        }
    }

    /// Append `v`. The inline slots fill first (`len` counts them and stays
    /// at `N` once they are full); the push past them moves all items to
    /// the heap, where later pushes go.
    #[inline]
    pub(crate) fn push(&mut self, v: T) {
        if self.len < N {
            self.buf[self.len] = v;
            self.len += 1;
        } else {
            self.spill(v);
        }
    }

    /// A push past the inline slots.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, v: T) {
        if self.more.is_empty() {
            self.more.extend_from_slice(&self.buf);
        }
        self.more.push(v);
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        if self.more.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.more
        }
    }

    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        if self.more.is_empty() {
            &mut self.buf[..self.len]
        } else {
            &mut self.more
        }
    }
}

impl<T: Copy, const N: usize> std::ops::Deref for Inline<T, N> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy, const N: usize> std::ops::DerefMut for Inline<T, N> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<'a, T: Copy, const N: usize> IntoIterator for &'a Inline<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

/// Compares the items only, as a `Vec` would.
impl<T: Copy + PartialEq, const N: usize> PartialEq for Inline<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Copy + Eq, const N: usize> Eq for Inline<T, N> {}

/// Prints the items only, as a `Vec` would.
impl<T: Copy + fmt::Debug, const N: usize> fmt::Debug for Inline<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::Inline;

    /// Compiles only while `Inline` is covariant in its item, as the
    /// public `Request<'a>` that holds one must stay (a `SmallVec` is not).
    #[allow(dead_code)]
    fn shortens<'a>(long: Inline<&'static str, 2>) -> Inline<&'a str, 2> {
        long
    }

    #[test]
    fn spills_to_the_heap_past_sixteen_in_order() {
        let mut l: Inline<u32> = Inline::filled(0);
        for i in 0..40 {
            l.push(i);
            assert_eq!(l.len(), i as usize + 1);
        }
        assert!(l.iter().copied().eq(0..40));
        l.as_mut_slice()[39] = 7;
        assert_eq!(l[39], 7);
    }

    #[test]
    fn equality_and_debug_see_the_items_not_the_spare_slots() {
        let mut a: Inline<u32, 2> = Inline::filled(1);
        let mut b: Inline<u32, 2> = Inline::filled(2);
        assert_eq!(a, b);
        a.push(5);
        b.push(5);
        assert_eq!(a, b);
        // One spilled, one inline: still the same items.
        a.push(6);
        a.push(7);
        let mut c: Inline<u32, 4> = Inline::filled(0);
        for v in [5, 6, 7] {
            c.push(v);
        }
        assert_eq!(a.as_slice(), c.as_slice());
        assert_eq!(format!("{a:?}"), format!("{:?}", vec![5, 6, 7]));
        assert_ne!(a, b);
        let d = a.clone();
        assert_eq!(d, a);
    }
}
