//! Usage log lines: JSON Lines or CSV, parsed from a reused line buffer
//! into events that borrow it.
//!
//! JSON Lines, one object a line:
//! `{"ts": "2026-04-01T09:00:00Z", "subject": "agent-7",
//!   "amounts": {"llm_tokens_input": 1200, "cost": "0.25"}, "model": "m", "event": "e-1"}`.
//! `ts` is RFC 3339 or Unix milliseconds; counts are integers, money is a
//! decimal string (or an integer); `model` and `event` are optional.
//!
//! CSV: a header naming the columns `ts`, `subject`, optional `model` and
//! `event`, and one column per meter; an empty cell is no amount. Cells are
//! not quoted (a quoted cell loses its quotes; commas inside are not
//! supported).

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// An amount as the log writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Num {
    /// A whole number.
    Int(u64),
    /// A decimal (money, or a count written with a fraction).
    Dec(Decimal),
}

/// One line of the log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event<'a> {
    /// When it happened, Unix milliseconds.
    #[serde(alias = "timestamp", deserialize_with = "timestamp")]
    pub ts: i64,
    /// Who spent it.
    #[serde(borrow)]
    pub subject: Cow<'a, str>,
    /// Meter → amount.
    #[serde(borrow, default)]
    pub amounts: AmountList<'a>,
    /// The model named.
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    /// The event id.
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
}

impl Event<'_> {
    /// An event with nothing read yet, for a parser to fill.
    pub fn empty() -> Self {
        Self {
            ts: 0,
            subject: Cow::Borrowed(""),
            amounts: AmountList::default(),
            model: None,
            event: None,
        }
    }
}

/// A line's amounts, meter and amount, the first four inline (a plain
/// array, not a `SmallVec`: the list must stay covariant in its lifetime for
/// serde to borrow into it).
#[derive(Debug)]
pub struct AmountList<'a> {
    head: [(Cow<'a, str>, Num); 4],
    len: usize,
    rest: Vec<(Cow<'a, str>, Num)>,
}

impl Default for AmountList<'_> {
    fn default() -> Self {
        const EMPTY: (Cow<'static, str>, Num) = (Cow::Borrowed(""), Num::Int(0));
        Self {
            head: [EMPTY; 4],
            len: 0,
            rest: Vec::new(),
        }
    }
}

impl<'a> AmountList<'a> {
    /// Add an amount.
    pub fn push(&mut self, meter: Cow<'a, str>, n: Num) {
        if self.len < self.head.len() {
            self.head[self.len] = (meter, n);
            self.len += 1;
        } else {
            self.rest.push((meter, n));
        }
    }

    /// Up to four whole amounts, if that is all there is.
    pub fn small_ints(&self) -> Option<&[(Cow<'a, str>, Num)]> {
        let head = &self.head[..self.len];
        (self.rest.is_empty() && head.iter().all(|(_, n)| matches!(n, Num::Int(_)))).then_some(head)
    }

    /// The amounts in order.
    pub fn iter(&self) -> impl Iterator<Item = &(Cow<'a, str>, Num)> {
        self.head[..self.len].iter().chain(self.rest.iter())
    }
}

/// Parse RFC 3339 text (`2026-04-01T09:00:00Z`) into Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Some(ms) = fast_time(text.as_bytes()) {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("timestamp `{text}`: {e}"))
}

/// The common RFC 3339 forms (`YYYY-MM-DDTHH:MM:SS`, optional fraction,
/// `Z` or `±HH:MM`) without chrono's general parser; `None` for anything
/// else (a leap second, a lower-case `t`, …), which chrono then reads.
fn fast_time(b: &[u8]) -> Option<i64> {
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (h, mi, s) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut date = [0u8; 10];
    date.copy_from_slice(&b[..10]);
    // A log's lines mostly share their date: the last one's day number
    // is reused (a cache of one, per thread; all zeros is no date).
    let days = match LAST_DATE.get() {
        (last, days) if last == date => days,
        _ => {
            let days = civil_days(&date)?;
            LAST_DATE.set((date, days));
            days
        }
    };
    let mut i = 19;
    let mut ms = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        match i - start {
            0 => return None,
            1 => ms *= 100,
            2 => ms *= 10,
            _ => {}
        }
    }
    let offset = match &b[i..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), oh @ .., b':', om1, om2] if oh.len() == 2 => {
            let (oh, om) = (num(oh)?, num(&[*om1, *om2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60_000;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    Some(((days * 24 + h) * 60 + mi) * 60_000 + s * 1_000 + ms - offset)
}

thread_local! {
    /// The date (`YYYY-MM-DD`) [`fast_time`] read last, and its day number.
    static LAST_DATE: std::cell::Cell<([u8; 10], i64)> =
        const { std::cell::Cell::new(([0; 10], 0)) };
}

/// Whole digits, or `None`.
fn num(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
    })
}

/// Days since the Unix epoch of a valid `YYYY-MM-DD` (H. Hinnant's
/// algorithm), or `None`.
fn civil_days(b: &[u8; 10]) -> Option<i64> {
    let (y, mo, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] {
        return None;
    }
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Parse a decimal or whole amount.
pub fn parse_num(text: &str) -> Result<Num, String> {
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Num::Int(n));
    }
    text.parse::<Decimal>()
        .map(Num::Dec)
        .map_err(|_| format!("amount `{text}` is not a number"))
}

fn timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Ts;
    impl Visitor<'_> for Ts {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 time or Unix milliseconds")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("timestamp out of range"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
            parse_time(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Ts)
}

impl<'de: 'a, 'a> Deserialize<'de> for AmountList<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Map)
    }
}

struct Map;

impl<'de> Visitor<'de> for Map {
    type Value = AmountList<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of meter to amount")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = AmountList::default();
        while let Some(meter) = map.next_key::<Text<'de>>()? {
            let n = map.next_value::<JsonNum>()?;
            out.push(meter.0, n.0);
        }
        Ok(out)
    }
}

/// A string borrowed from the line when it has no escapes (serde's own
/// `Cow<str>` always copies).
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// An amount in JSON: an integer, or a decimal string. A JSON fraction
/// (`0.25`) is refused: it would pass through a float.
struct JsonNum(Num);

impl<'de> Deserialize<'de> for JsonNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = JsonNum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number, or a decimal as a string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonNum, E> {
                Ok(JsonNum(Num::Int(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonNum, E> {
                Err(E::custom(format!("negative amount {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonNum, E> {
                Err(E::custom(format!(
                    "amount {v} is a JSON fraction; write it as a string (\"{v}\") to keep it exact"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<JsonNum, E> {
                parse_num(v).map(JsonNum).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse one JSON line. The line is checked as UTF-8 once, then parsed as
/// text (serde_json's byte reader checks every string again).
pub fn json_line<T>(
    line: &[u8],
    then: impl FnOnce(&Event<'_>) -> Result<T, String>,
) -> Result<T, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
    // The event lives in this frame and is handed on by reference: parsed
    // in place, never moved.
    let mut ev = Event::empty();
    if crate::fast::line_into(text, &mut ev).is_some() {
        return then(&ev);
    }
    let ev: Event<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    then(&ev)
}

/// A CSV column.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column {
    Ts,
    Subject,
    Model,
    Event,
    Meter(String),
}

/// A CSV log's columns, from its header.
#[derive(Debug, Clone)]
pub struct CsvHeader {
    columns: Vec<Column>,
}

fn cell(text: &str) -> &str {
    let t = text.trim();
    t.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t)
}

impl CsvHeader {
    /// Read the header line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let columns: Vec<Column> = line
            .split(',')
            .map(|c| match cell(c) {
                "ts" | "timestamp" => Column::Ts,
                "subject" => Column::Subject,
                "model" => Column::Model,
                "event" => Column::Event,
                meter => Column::Meter(meter.to_owned()),
            })
            .collect();
        for need in [Column::Ts, Column::Subject] {
            if !columns.contains(&need) {
                return Err(format!("CSV header has no `{need:?}` column").to_lowercase());
            }
        }
        if columns.contains(&Column::Meter(String::new())) {
            return Err("CSV header has an empty column name".to_owned());
        }
        Ok(Self { columns })
    }

    /// Parse one data line.
    pub fn line<'a>(&'a self, line: &'a str) -> Result<Event<'a>, String> {
        let mut ev = Event {
            ts: 0,
            subject: Cow::Borrowed(""),
            amounts: AmountList::default(),
            model: None,
            event: None,
        };
        let mut n = 0;
        for (i, raw) in line.split(',').enumerate() {
            let Some(col) = self.columns.get(i) else {
                return Err(format!(
                    "{} cells, the header has {}",
                    line.split(',').count(),
                    self.columns.len()
                ));
            };
            n = i + 1;
            let v = cell(raw);
            match col {
                Column::Ts => ev.ts = parse_ms_or_time(v)?,
                Column::Subject => ev.subject = Cow::Borrowed(v),
                Column::Model if !v.is_empty() => ev.model = Some(Cow::Borrowed(v)),
                Column::Event if !v.is_empty() => ev.event = Some(Cow::Borrowed(v)),
                Column::Meter(m) if !v.is_empty() => {
                    let num = parse_num(v).map_err(|e| format!("column `{m}`: {e}"))?;
                    ev.amounts.push(Cow::Borrowed(m.as_str()), num);
                }
                _ => {}
            }
        }
        if n != self.columns.len() {
            return Err(format!("{n} cells, the header has {}", self.columns.len()));
        }
        if ev.subject.is_empty() {
            return Err("empty subject".to_owned());
        }
        Ok(ev)
    }
}

fn parse_ms_or_time(v: &str) -> Result<i64, String> {
    match v.parse::<i64>() {
        Ok(ms) => Ok(ms),
        Err(_) => parse_time(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_time_parser_agrees_with_chrono() {
        for t in [
            "2026-04-01T09:00:00Z",
            "2026-04-01T09:00:00.5Z",
            "2026-04-01T09:00:00.25Z",
            "2026-04-01T09:00:00.123456789Z",
            "2024-02-29T23:59:59+09:30",
            "1969-12-31T23:59:59.999-05:00",
            "2000-03-01T00:00:00Z",
            "1600-01-01T00:00:00Z",
        ] {
            let chrono = chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_millis();
            assert_eq!(fast_time(t.as_bytes()), Some(chrono), "{t}");
        }
        for t in [
            "2026-02-29T00:00:00Z",
            "2026-04-01T24:00:00Z",
            "2026-04-01T09:00:00",
            "2026-04-01T09:00:00.Z",
        ] {
            assert_eq!(fast_time(t.as_bytes()), None, "{t}");
            assert!(parse_time(t).is_err(), "{t}");
        }
    }

    #[test]
    fn the_last_date_reused_gives_the_same_instants() {
        // Same date, another date, back, and a bad time on a cached date.
        for t in [
            "2026-04-01T09:00:00Z",
            "2026-04-01T23:59:59.5Z",
            "2026-04-02T00:00:00+01:00",
            "2026-04-01T00:00:00-01:00",
            "2026-04-01T00:00:00Z",
        ] {
            let chrono = chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .timestamp_millis();
            assert_eq!(fast_time(t.as_bytes()), Some(chrono), "{t}");
        }
        assert_eq!(fast_time(b"2026-04-01T25:00:00Z"), None);
        assert_eq!(fast_time(b"2026-04-31T00:00:00Z"), None);
    }
}
