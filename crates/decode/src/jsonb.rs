//! JSON values compared as PostgreSQL's `jsonb` compares them, for telling a duplicate (the same
//! reading again) from a conflict (a different reading under the same key) before the database
//! sees the batch. The database decides against stored rows with `jsonb =`; a batch must decide
//! alike, or the same two messages are a duplicate in one batch and a conflict in two.
//!
//! `serde_json::Value` is not enough: its numbers are `f64` past `u64`, so two readings whose
//! numbers differ beyond f64's 17 digits (a 23-digit counter, `0.3` and `0.30000000000000001`)
//! compare equal and the second would be dropped as a duplicate, silently; and it tells `1` from
//! `1.0`, which `jsonb` does not. Here numbers are compared exactly, as decimals: `1 = 1.0 = 1e0`,
//! `-0 = 0`. Keys are unordered, the last of a duplicated key counts, strings compare after
//! unescaping, arrays in order: as `jsonb`.

use std::collections::BTreeMap;

/// Whether `a` and `b` are the same JSON value as `jsonb` compares them. `false` when either is not
/// valid JSON.
pub fn same_json(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

#[derive(Debug, PartialEq)]
enum J {
    Null,
    Bool(bool),
    /// `(-1)^neg * digits * 10^exp`, `digits` without leading or trailing zeros (empty for zero,
    /// which has no sign).
    Num {
        neg: bool,
        digits: Vec<u8>,
        exp: i64,
    },
    Str(String),
    Arr(Vec<J>),
    Obj(BTreeMap<String, J>),
}

/// Nesting deeper than serde_json's limit is not parsed (the decoder refuses it anyway).
const MAX_DEPTH: usize = 256;

fn parse(s: &str) -> Option<J> {
    let mut p = Parser {
        b: s.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    (p.i == p.b.len()).then_some(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<J> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.b.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut o = BTreeMap::new();
                if self.eat(b'}') {
                    return Some(J::Obj(o));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    if !self.eat(b':') {
                        return None;
                    }
                    let v = self.value(depth + 1)?;
                    o.insert(k, v);
                    if self.eat(b'}') {
                        return Some(J::Obj(o));
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut a = Vec::new();
                if self.eat(b']') {
                    return Some(J::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Some(J::Arr(a));
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'"' => self.string().map(J::Str),
            b't' => self.word("true", J::Bool(true)),
            b'f' => self.word("false", J::Bool(false)),
            b'n' => self.word("null", J::Null),
            _ => self.number(),
        }
    }

    fn word(&mut self, w: &str, v: J) -> Option<J> {
        if self.b[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Some(v)
        } else {
            None
        }
    }

    /// A string literal, unescaped (by serde_json, so exactly as the decoder reads it).
    fn string(&mut self) -> Option<String> {
        let start = self.i;
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        let lit = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        serde_json::from_str(lit).ok()
    }

    fn number(&mut self) -> Option<J> {
        let neg = self.b.get(self.i) == Some(&b'-');
        if neg {
            self.i += 1;
        }
        let mut digits = Vec::new();
        let int = self.digits(&mut digits);
        if int == 0 {
            return None;
        }
        let mut exp: i64 = 0;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            let frac = self.digits(&mut digits);
            if frac == 0 {
                return None;
            }
            exp = -(frac as i64);
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            let eneg = match self.b.get(self.i) {
                Some(b'-') => {
                    self.i += 1;
                    true
                }
                Some(b'+') => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            let mut e: i64 = 0;
            let mut n = 0;
            while let Some(d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
                e = e.saturating_mul(10).saturating_add(i64::from(d - b'0'));
                self.i += 1;
                n += 1;
            }
            if n == 0 {
                return None;
            }
            exp = exp.saturating_add(if eneg { -e } else { e });
        }
        let first = digits.iter().position(|d| *d != b'0');
        let Some(first) = first else {
            return Some(J::Num {
                neg: false,
                digits: Vec::new(),
                exp: 0,
            });
        };
        let last = digits.iter().rposition(|d| *d != b'0').unwrap_or(first);
        exp = exp.saturating_add((digits.len() - 1 - last) as i64);
        Some(J::Num {
            neg,
            digits: digits[first..=last].to_vec(),
            exp,
        })
    }

    fn digits(&mut self, into: &mut Vec<u8>) -> usize {
        let start = self.i;
        while let Some(d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
            into.push(*d);
            self.i += 1;
        }
        self.i - start
    }
}

#[cfg(test)]
mod tests {
    use super::same_json;

    #[test]
    fn equal_as_jsonb_compares() {
        for (a, b) in [
            (r#"{"ts":1,"v":1}"#, r#"{ "v" : 1.0, "ts" : 1e0 }"#),
            ("100", "1E2"),
            ("1.5", "1.50"),
            ("0", "-0.0e7"),
            (
                "123456789012345678901234567890",
                "1.2345678901234567890123456789e29",
            ),
            (r#""é""#, r#""\u00e9""#),
            (r#""😀""#, r#""\ud83d\ude00""#),
            (r#""a/b""#, r#""a\/b""#),
            (r#"{"a":0,"a":1}"#, r#"{"a":1}"#),
            ("[1, [2, {}]]", "[1,[2,{}]]"),
        ] {
            assert!(same_json(a, b), "{a} = {b}");
        }
    }

    #[test]
    fn different_as_jsonb_compares() {
        for (a, b) in [
            ("0.3", "0.30000000000000001"),
            ("12345678901234567890123", "12345678901234567890124"),
            ("1.0", "1.00000000000000000001"),
            ("1e-400", "0"),
            ("1", "-1"),
            ("[1,2]", "[2,1]"),
            (r#"{"a":1}"#, r#"{"a":1,"b":null}"#),
            (r#"{"a":1,"a":0}"#, r#"{"a":1}"#),
            ("1", r#""1""#),
            ("null", "false"),
            ("{}", "not json"),
        ] {
            assert!(!same_json(a, b), "{a} != {b}");
        }
    }
}
