//! Secrets: values that never print ([`Secret`]), and masking them in text
//! bound for a log, an error or a caller ([`Redactor`]).

use std::{fmt, str::FromStr};

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is sent, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Masks secret values in text bound for a log, an error or a caller: a
/// program that prints its environment must not hand its secrets on.
#[derive(Debug, Clone, Default)]
pub struct Redactor(Vec<Secret>);

impl Redactor {
    /// Values shorter than this are not masked: they would mask ordinary
    /// words, and are no secret anyway.
    pub const MIN_LEN: usize = 4;

    /// Masks `values`, and each line of those with several (a key file
    /// printed line by line).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut values: Vec<Secret> = values
            .into_iter()
            .flat_map(|v| std::iter::once(v).chain(v.lines().filter(move |line| line.len() < v.len())))
            .map(|v| v.trim_end_matches('\r'))
            .filter(|v| v.len() >= Self::MIN_LEN)
            .map(Secret::new)
            .collect();
        // The longest first, so that one value inside another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.0.len()));
        Self(values)
    }

    /// `text` with every secret value replaced by `[secret]`.
    pub fn redact<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        let mut text = std::borrow::Cow::Borrowed(text);
        for value in &self.0 {
            if text.contains(value.expose()) {
                text = std::borrow::Cow::Owned(text.replace(value.expose(), "[secret]"));
            }
        }
        text
    }

    /// Masks the secret values in `text` in place.
    pub fn redact_in_place(&self, text: &mut String) {
        if let std::borrow::Cow::Owned(masked) = self.redact(text) {
            *text = masked;
        }
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_masks_every_secret_and_leaves_the_rest() {
        let r = Redactor::new([
            "sk-live-123",
            "sk-live-123-extended",
            "abc",
            "line-one\r\nline-two\n",
        ]);
        assert_eq!(r.redact("line-one"), "[secret]");
        assert_eq!(r.redact("a line-two"), "a [secret]");
        assert_eq!(
            r.redact("key sk-live-123-extended and sk-live-123, abc"),
            "key [secret] and [secret], abc"
        );
        assert!(matches!(r.redact("nothing here"), std::borrow::Cow::Borrowed(_)));
        let mut line = "x=sk-live-123".to_owned();
        r.redact_in_place(&mut line);
        assert_eq!(line, "x=[secret]");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(s.expose(), "hunter2");
    }
}
