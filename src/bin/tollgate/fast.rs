//! A fast path for the usual JSON line: a flat object of known keys,
//! strings without escapes, whole-number amounts. Anything else (an escape,
//! an unknown or repeated key, a fraction, nesting) returns `None` and the
//! line goes through serde_json, which also words its errors.

use std::borrow::Cow;

use crate::log::{parse_time, AmountList, Event, Num};

/// Bytes that end the fast scan of a string: the closing quote, a
/// backslash (an escape) and control bytes (invalid JSON).
static STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The length of the string body at the start of `b`, up to its closing
/// quote; `None` at an escape, a control byte or the end of the line.
/// Kept out of line: a tight loop of its own, one table load per byte.
#[inline(never)]
fn string_len(b: &[u8]) -> Option<usize> {
    // A byte at a time: the strings are short (keys, ids, a timestamp), and
    // eight bytes a step (SWAR) measured 25 % more instructions here.
    let i = b.iter().position(|&c| STOP[usize::from(c)])?;
    (b[i] == b'"').then_some(i)
}

/// The length of the run of JSON whitespace at the start of `b`.
#[inline(never)]
fn ws_len(b: &[u8]) -> usize {
    b.iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(b.len())
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn ws(&mut self) {
        // Usually one space or none: checked here, a longer run scanned.
        if let Some(b' ' | b'\t' | b'\r' | b'\n') = self.text.as_bytes().get(self.at) {
            self.at += 1;
            self.at += ws_len(&self.text.as_bytes()[self.at..]);
        }
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.text.as_bytes().get(self.at) == Some(&c)).then(|| self.at += 1)
    }

    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.text.as_bytes().get(self.at).copied()
    }

    /// A string without escapes (the quote already next).
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        // Escapes and control bytes send the line to serde_json.
        let len = string_len(&self.text.as_bytes()[start..])?;
        let s = &self.text[start..start + len];
        self.at = start + len + 1;
        Some(s)
    }

    /// A whole number without sign, fraction or exponent.
    #[inline]
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let b = self.text.as_bytes();
        let start = self.at;
        let mut n: u64 = 0;
        while self.at < b.len() && b[self.at].is_ascii_digit() {
            n = n
                .checked_mul(10)?
                .checked_add(u64::from(b[self.at] - b'0'))?;
            self.at += 1;
        }
        let next = b.get(self.at).copied();
        (self.at > start && !matches!(next, Some(b'.' | b'e' | b'E'))).then_some(n)
    }

    /// `null` or a string.
    #[inline]
    fn opt_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            let rest = &self.text.as_bytes()[self.at..];
            if rest.starts_with(b"null") {
                self.at += 4;
                return Some(None);
            }
            return None;
        }
        self.string().map(Some)
    }

    /// The amounts object, pushed onto `out` (the event's own list: built
    /// in place, not returned).
    fn amounts(&mut self, out: &mut AmountList<'a>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let meter = self.string()?;
            self.eat(b':')?;
            let n = match self.peek()? {
                b'"' => crate::log::parse_num(self.string()?).ok()?,
                _ => Num::Int(self.uint()?),
            };
            out.push(Cow::Borrowed(meter), n);
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

/// Read the line into `ev` (an empty event), if it is in the usual shape;
/// `None` leaves `ev` partly filled, for the caller to drop.
pub fn line_into<'a>(text: &'a str, ev: &mut Event<'a>) -> Option<()> {
    let mut c = Cursor { text, at: 0 };
    c.eat(b'{')?;
    let (mut ts, mut subject, mut amounts) = (false, false, false);
    let (mut model, mut event) = (false, false);
    loop {
        let key = c.string()?;
        c.eat(b':')?;
        // Each field written where the event keeps it: no event struct
        // assembled and then moved.
        match key {
            "ts" | "timestamp" if !ts => {
                ts = true;
                ev.ts = match c.peek()? {
                    b'"' => parse_time(c.string()?).ok()?,
                    _ => i64::try_from(c.uint()?).ok()?,
                };
            }
            "subject" if !subject => {
                subject = true;
                ev.subject = Cow::Borrowed(c.string()?);
            }
            "amounts" if !amounts => {
                amounts = true;
                c.amounts(&mut ev.amounts)?;
            }
            "model" if !model => {
                model = true;
                ev.model = c.opt_string()?.map(Cow::Borrowed);
            }
            "event" if !event => {
                event = true;
                ev.event = c.opt_string()?.map(Cow::Borrowed);
            }
            _ => return None,
        }
        match c.peek()? {
            b',' => c.at += 1,
            b'}' => {
                c.at += 1;
                break;
            }
            _ => return None,
        }
    }
    c.ws();
    (c.at == text.len() && ts && subject).then_some(())
}

/// The line as an event, if it is in the usual shape.
#[cfg(test)]
fn line(text: &str) -> Option<Event<'_>> {
    let mut ev = Event::empty();
    line_into(text, &mut ev)?;
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(text: &str) {
        let slow: Event<'_> = serde_json::from_str(text).unwrap();
        let fast = line(text).unwrap_or_else(|| panic!("not fast: {text}"));
        assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{text}");
    }

    #[test]
    fn the_fast_path_reads_what_serde_reads() {
        same(r#"{"ts": 1775034000000, "subject": "a", "amounts": {"x": 1, "y": "2.50"}}"#);
        same(
            r#" { "timestamp":"2026-04-01T09:00:00Z","subject":"agent-7","amounts":{},"model":"m","event":"e-1" } "#,
        );
        same(r#"{"subject": "a", "ts": "2026-04-01T09:00:00.25+02:00", "model": null}"#);
        same(r#"{"ts": 0, "subject": "a", "amounts": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}}"#);
    }

    #[test]
    fn string_len_finds_the_first_stop_byte_at_every_offset() {
        for n in 0..20 {
            for stop in [b'"', b'\\', b'\n', 0x1f] {
                let mut b = vec![b'a'; n];
                b.extend_from_slice("é€".as_bytes());
                b.push(stop);
                b.extend_from_slice(b"zz\"");
                let want = (stop == b'"').then_some(n + 5);
                assert_eq!(string_len(&b), want, "{n} {stop}");
            }
            assert_eq!(string_len(&vec![b'a'; n]), None);
        }
    }

    #[test]
    fn anything_unusual_falls_back() {
        for text in [
            r#"{"ts": 1, "subject": "a\"b"}"#,
            r#"{"ts": 1, "subject": "a", "colour": 1}"#,
            r#"{"ts": 1, "subject": "a", "subject": "b"}"#,
            r#"{"ts": 1, "subject": "a", "amounts": {"x": 1.5}}"#,
            r#"{"ts": 1, "subject": "a", "amounts": {"x": -1}}"#,
            r#"{"ts": 1, "subject": "a", "amounts": {"x": 1e3}}"#,
            r#"{"ts": 1, "subject": "a"} x"#,
            r#"{"ts": 1}"#,
            r#"{"ts": 1, "subject": "a", "amounts": {"x": 99999999999999999999}}"#,
            r#"{"ts": "yesterday", "subject": "a"}"#,
        ] {
            assert!(line(text).is_none(), "{text}");
        }
    }
}
