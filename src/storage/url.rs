//! `s3://bucket/key` URLs, parsed once into a validated [`S3Url`].

use std::fmt;

/// A validated object location: `s3://<bucket>/<key>`.
///
/// The bucket follows the S3 naming rules; the key is non-empty, at most
/// 1024 bytes, and free of the forms that mean different things to
/// different tools: control characters, backslashes, `?`, `#`, `%`, empty
/// segments, and `.` or `..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    bucket: String,
    key: String,
}

/// Why a string is not an acceptable `s3://` URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The string does not start with `s3://`.
    #[error("expected an s3://bucket/key URL")]
    Scheme,
    /// The bucket name breaks the S3 naming rules.
    #[error("bucket name {0:?} is not valid: use 3-63 lower-case letters, digits, '-' or '.'")]
    Bucket(String),
    /// The key is empty, too long, or contains an ambiguous form.
    #[error("object key is not valid: {0}")]
    Key(&'static str),
}

impl S3Url {
    /// Parses `s3://bucket/key`.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let rest = s.strip_prefix("s3://").ok_or(UrlError::Scheme)?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        Self::new(bucket, key)
    }

    /// Builds a URL from a bucket and a key, validating both.
    pub fn new(bucket: &str, key: &str) -> Result<Self, UrlError> {
        validate_bucket(bucket)?;
        validate_key(key)?;
        Ok(Self {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The object key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The file extension of the key's last segment (without the dot), if it
    /// is short and alphanumeric; used to name staged files.
    pub fn extension(&self) -> Option<&str> {
        let name = self.key.rsplit('/').next()?;
        let (stem, ext) = name.rsplit_once('.')?;
        let plausible = !stem.is_empty()
            && (1..=16).contains(&ext.len())
            && ext.bytes().all(|b| b.is_ascii_alphanumeric());
        plausible.then_some(ext)
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

fn validate_bucket(b: &str) -> Result<(), UrlError> {
    let bad = || UrlError::Bucket(b.chars().take(64).collect());
    if !(3..=63).contains(&b.len()) {
        return Err(bad());
    }
    let allowed = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.';
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = b.as_bytes();
    if !bytes.iter().all(|&c| allowed(c))
        || !edge(bytes[0])
        || !edge(bytes[bytes.len() - 1])
        || b.contains("..")
    {
        return Err(bad());
    }
    Ok(())
}

fn validate_key(k: &str) -> Result<(), UrlError> {
    if k.is_empty() {
        return Err(UrlError::Key("it is empty; name an object, not a bucket"));
    }
    if k.len() > 1024 {
        return Err(UrlError::Key("it is longer than 1024 bytes"));
    }
    if k.chars().any(|c| c.is_control()) {
        return Err(UrlError::Key("it contains control characters"));
    }
    if k.contains(['\\', '?', '#', '%']) {
        return Err(UrlError::Key("it contains one of \\ ? # %"));
    }
    if k.split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(UrlError::Key(
            "it has an empty, '.' or '..' segment (a leading, trailing or double '/')",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_urls() {
        let u = S3Url::parse("s3://my-bucket/dir/file.mp4").unwrap();
        assert_eq!((u.bucket(), u.key()), ("my-bucket", "dir/file.mp4"));
        assert_eq!(u.extension(), Some("mp4"));
        assert_eq!(u.to_string(), "s3://my-bucket/dir/file.mp4");
    }

    #[test]
    fn rejects_ambiguous_forms() {
        for bad in [
            "http://b/k",
            "s3:/bucket/k",
            "S3://bucket/k",
            "s3://bucket",
            "s3://bucket/",
            "s3://Bucket/k",
            "s3://b/k",
            "s3://bucket-/k",
            "s3://a..b/k",
            "s3://bucket//k",
            "s3://bucket/a/../k",
            "s3://bucket/./k",
            "s3://bucket/k/",
            "s3://bucket/k?versionId=1",
            "s3://bucket/k#frag",
            "s3://bucket/k%2F",
            "s3://bucket/a\\b",
            "s3://bucket/a\nb",
            "s3://user@bucket/k",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn extension_is_only_taken_when_plausible() {
        let ext = |s: &str| S3Url::parse(s).unwrap().extension().map(str::to_owned);
        assert_eq!(ext("s3://bkt/a/.hidden"), None);
        assert_eq!(ext("s3://bkt/noext"), None);
        assert_eq!(ext("s3://bkt/x.tar.gz"), Some("gz".into()));
        assert_eq!(ext("s3://bkt/x.a b"), None);
    }
}
