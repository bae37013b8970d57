//! Text from elsewhere (peers' announcements, a node's API) made safe to print on a terminal.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every character that could drive the terminal or reorder what it shows
/// written out as an escape (`\u{1b}`): control characters (C0, DEL, C1: escape sequences,
/// carriage returns, bells) and the Unicode bidirectional controls that make text display
/// in another order than it reads. A peer names its models and its agent string itself, so
/// printing them raw would let it rewrite the user's screen.
pub(crate) fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            // Writing to a String cannot fail.
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_left_alone() {
        for text in ["smollm2-135m-instruct", "pod/0.1.0", "modèle 模型 🙂", ""] {
            assert!(matches!(printable(text), Cow::Borrowed(t) if t == text));
        }
    }

    #[test]
    fn control_characters_and_bidi_controls_are_escaped() {
        assert_eq!(
            printable("evil\u{1b}]0;owned\u{7}\u{1b}[2J"),
            "evil\\u{1b}]0;owned\\u{7}\\u{1b}[2J"
        );
        assert_eq!(
            printable("a\rb\nc\td\u{7f}"),
            "a\\u{d}b\\u{a}c\\u{9}d\\u{7f}"
        );
        // C1 controls: U+009B is a one-character CSI on some terminals.
        assert_eq!(printable("x\u{9b}31m"), "x\\u{9b}31m");
        assert_eq!(printable("gguf\u{202e}exe.txt"), "gguf\\u{202e}exe.txt");
        assert_eq!(printable("\u{2066}a\u{2069}"), "\\u{2066}a\\u{2069}");
        // Nothing that drives a terminal is left.
        let out = printable("\u{0}\u{1f}\u{80}\u{9f}\u{200f}");
        assert!(!out.chars().any(needs_escape), "{out:?}");
    }
}
