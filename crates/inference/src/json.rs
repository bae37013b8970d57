//! Incremental JSON validation for `response_format: json_object`: decides whether text keeps
//! the output a valid prefix of one JSON object, so generation can be constrained token by
//! token.

/// What may come next outside of a string, number or literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Any value (the top level accepts only an object).
    Value,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key.
    Colon,
    /// After a member's value: `,` or `}`.
    ObjNext,
    /// After `[`: a value or `]`.
    ElemOrEnd,
    /// After an element: `,` or `]`.
    ArrNext,
    /// The top-level object is closed.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    EDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    None,
    /// Inside a string; `escape` counts pending escape characters (1 after `\`, 2..=5 while
    /// reading `\uXXXX` digits).
    Str {
        key: bool,
        escape: u8,
    },
    Num(Num),
    Lit {
        word: &'static str,
        at: usize,
    },
}

/// Most consecutive whitespace characters allowed between tokens, so a model cannot stall
/// forever on blanks.
const MAX_WHITESPACE_RUN: u8 = 24;

/// State of a JSON object being generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPrefix {
    stack: Vec<u8>,
    expect: Expect,
    lex: Lex,
    blanks: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self {
            stack: Vec::new(),
            expect: Expect::Value,
            lex: Lex::None,
            blanks: 0,
        }
    }
}

impl JsonPrefix {
    /// Whether the top-level object is complete.
    pub fn is_complete(&self) -> bool {
        self.expect == Expect::Done
    }

    /// The state after `text`, or `None` if `text` cannot continue a JSON object.
    pub fn advance(&self, text: &str) -> Option<Self> {
        let mut s = self.clone();
        for c in text.chars() {
            if !s.push(c) {
                return None;
            }
        }
        Some(s)
    }

    fn after_value(&mut self) {
        self.lex = Lex::None;
        self.expect = match self.stack.last() {
            Some(b'{') => Expect::ObjNext,
            Some(_) => Expect::ArrNext,
            None => Expect::Done,
        };
    }

    fn push(&mut self, c: char) -> bool {
        match self.lex {
            Lex::Str { key, escape } => return self.string(c, key, escape),
            Lex::Num(n) => {
                if let Some(next) = number(n, c) {
                    self.lex = Lex::Num(next);
                    return true;
                }
                if !matches!(n, Num::Zero | Num::Int | Num::Frac | Num::EDigits) {
                    return false;
                }
                self.after_value();
            }
            Lex::Lit { word, at } => {
                if word[at..].starts_with(c) {
                    if at + c.len_utf8() == word.len() {
                        self.after_value();
                    } else {
                        self.lex = Lex::Lit {
                            word,
                            at: at + c.len_utf8(),
                        };
                    }
                    return true;
                }
                return false;
            }
            Lex::None => {}
        }
        if matches!(c, ' ' | '\n' | '\t' | '\r') {
            if self.expect == Expect::Done || self.blanks >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.blanks += 1;
            return true;
        }
        self.blanks = 0;
        match (self.expect, c) {
            (Expect::Value | Expect::ElemOrEnd, '{') => {
                self.stack.push(b'{');
                self.expect = Expect::KeyOrEnd;
                true
            }
            (Expect::Value | Expect::ElemOrEnd, _) if self.stack.is_empty() => false,
            (Expect::Value | Expect::ElemOrEnd, '[') => {
                self.stack.push(b'[');
                self.expect = Expect::ElemOrEnd;
                true
            }
            (Expect::ElemOrEnd | Expect::ArrNext, ']') => {
                self.stack.pop();
                self.after_value();
                true
            }
            (Expect::Value | Expect::ElemOrEnd, '"') => {
                self.lex = Lex::Str {
                    key: false,
                    escape: 0,
                };
                true
            }
            (Expect::Value | Expect::ElemOrEnd, '-') => {
                self.lex = Lex::Num(Num::Minus);
                true
            }
            (Expect::Value | Expect::ElemOrEnd, '0') => {
                self.lex = Lex::Num(Num::Zero);
                true
            }
            (Expect::Value | Expect::ElemOrEnd, '1'..='9') => {
                self.lex = Lex::Num(Num::Int);
                true
            }
            (Expect::Value | Expect::ElemOrEnd, 't' | 'f' | 'n') => {
                let word = match c {
                    't' => "true",
                    'f' => "false",
                    _ => "null",
                };
                self.lex = Lex::Lit { word, at: 1 };
                true
            }
            (Expect::KeyOrEnd | Expect::Key, '"') => {
                self.lex = Lex::Str {
                    key: true,
                    escape: 0,
                };
                true
            }
            (Expect::KeyOrEnd | Expect::ObjNext, '}') => {
                self.stack.pop();
                self.after_value();
                true
            }
            (Expect::Colon, ':') => {
                self.expect = Expect::Value;
                true
            }
            (Expect::ObjNext, ',') => {
                self.expect = Expect::Key;
                true
            }
            (Expect::ArrNext, ',') => {
                self.expect = Expect::Value;
                true
            }
            _ => false,
        }
    }

    fn string(&mut self, c: char, key: bool, escape: u8) -> bool {
        let next = match escape {
            0 => match c {
                '"' => {
                    if key {
                        self.lex = Lex::None;
                        self.expect = Expect::Colon;
                    } else {
                        self.after_value();
                    }
                    return true;
                }
                '\\' => 1,
                c if (c as u32) < 0x20 => return false,
                _ => 0,
            },
            1 => match c {
                '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => 0,
                'u' => 5,
                _ => return false,
            },
            n => {
                if !c.is_ascii_hexdigit() {
                    return false;
                }
                if n == 2 {
                    0
                } else {
                    n - 1
                }
            }
        };
        self.lex = Lex::Str { key, escape: next };
        true
    }
}

fn number(n: Num, c: char) -> Option<Num> {
    use Num::*;
    Some(match (n, c) {
        (Minus, '0') => Zero,
        (Minus, '1'..='9') => Int,
        (Int, '0'..='9') => Int,
        (Zero | Int, '.') => Dot,
        (Dot | Frac, '0'..='9') => Frac,
        (Zero | Int | Frac, 'e' | 'E') => E,
        (E, '+' | '-') => ESign,
        (E | ESign | EDigits, '0'..='9') => EDigits,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> bool {
        JsonPrefix::default()
            .advance(text)
            .is_some_and(|s| s.is_complete())
    }

    fn prefix_ok(text: &str) -> bool {
        JsonPrefix::default().advance(text).is_some()
    }

    #[test]
    fn accepts_objects_piece_by_piece() {
        let doc = r#"{"a": [1, -2.5e3, true, null, {"b": "x\"\u00e9y"}], "c": {}, "d": []}"#;
        assert!(complete(doc));
        let mut s = JsonPrefix::default();
        for piece in doc.split_inclusive([',', ':', '"']) {
            s = s.advance(piece).unwrap();
        }
        assert!(s.is_complete());
        assert!(serde_json::from_str::<serde_json::Value>(doc).is_ok());
    }

    #[test]
    fn rejects_what_cannot_continue() {
        for bad in [
            "[1]",
            "\"x\"",
            "{a",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\":01",
            "{\"a\":tru ",
            "{}x",
            "{\"a\":1,}",
            "{\"a\":-}",
            "{\"\u{1}\"",
        ] {
            assert!(!prefix_ok(bad) || !complete(bad), "{bad:?} accepted");
        }
        assert!(!prefix_ok("{}x"));
        assert!(!prefix_ok("[1]"));
        assert!(prefix_ok("{\"a\": 12"));
        assert!(!complete("{\"a\": 12"));
    }

    #[test]
    fn limits_whitespace_runs() {
        assert!(prefix_ok(&format!("{{{}", " ".repeat(24))));
        assert!(!prefix_ok(&format!("{{{}", " ".repeat(25))));
    }
}
