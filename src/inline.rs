//! A small list kept inline, for per-call bookkeeping without allocation.

/// A list kept inline up to `N` items (16 by default) and on the heap past
/// that, so a call's bookkeeping for an ordinary plan allocates nothing.
pub(crate) struct Inline<T: Copy + Default, const N: usize = 16> {
    len: usize,
    buf: [T; N],
    more: Vec<T>,
}

impl<T: Copy + Default, const N: usize> Inline<T, N> {
    pub(crate) fn new() -> Self {
        Self {
            len: 0,
            buf: [T::default(); N],
            more: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, v: T) {
        if self.more.is_empty() && self.len < self.buf.len() {
            self.buf[self.len] = v;
            self.len += 1;
        } else {
            if self.more.is_empty() {
                self.more.extend_from_slice(&self.buf[..self.len]);
            }
            self.more.push(v);
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        if self.more.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.more
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        if self.more.is_empty() {
            &mut self.buf[..self.len]
        } else {
            &mut self.more
        }
    }
}

impl<T: Copy + Default, const N: usize> std::ops::Deref for Inline<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy + Default, const N: usize> std::ops::DerefMut for Inline<T, N> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<'a, T: Copy + Default, const N: usize> IntoIterator for &'a Inline<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

#[cfg(test)]
mod tests {
    use super::Inline;

    #[test]
    fn spills_to_the_heap_past_sixteen_in_order() {
        let mut l: Inline<u32> = Inline::new();
        for i in 0..40 {
            l.push(i);
            assert_eq!(l.len(), i as usize + 1);
        }
        assert!(l.iter().copied().eq(0..40));
        l.as_mut_slice()[39] = 7;
        assert_eq!(l[39], 7);
    }
}
