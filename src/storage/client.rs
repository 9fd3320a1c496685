//! Building the S3 client from its [`Settings`].

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore, rustls_provider::CryptoMode};
use aws_smithy_types::{retry::RetryConfig, timeout::TimeoutConfig};

use prefab_sdk::secret::Secret;

use super::ChecksumMode;

/// How to reach and talk to the store.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An S3-compatible endpoint, `scheme://host[:port]`; `None`: AWS S3.
    pub endpoint_url: Option<String>,
    /// The signing region.
    pub region: String,
    /// Whether requests name the bucket in the path rather than the host.
    pub path_style: bool,
    /// The access key id and its secret; neither: the SDK's anonymous
    /// requests.
    pub access_key_id: Option<Secret>,
    /// See `access_key_id`.
    pub secret_access_key: Option<Secret>,
    /// How long a transfer keeps retrying a failing store without progress.
    pub retry_budget: Duration,
    /// How uploads prove their bytes to the store.
    pub checksum: ChecksumMode,
}

/// Why the S3 settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URL is malformed or has a path component.
    #[error(
        "S3_ENDPOINT_URL {0:?} is not valid: use scheme://host[:port] with no path, e.g. http://127.0.0.1:8333"
    )]
    Endpoint(String),
    /// Only one of the access key id and secret was given.
    #[error("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")]
    PartialCredentials,
}

/// Connects to AWS or an S3-compatible store.
///
/// The SDK computes and validates checksums only where an operation
/// requires them, which every S3-compatible store accepts; payload
/// integrity is the transfer code's (see [`super::compat`]). The SDK does
/// not retry: [`super::retry`] is the one retry policy, with a time budget.
pub fn connect(args: &Settings) -> Result<super::Storage, ClientError> {
    let mut http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring));
    if args
        .endpoint_url
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"))
    {
        // A plain-HTTP endpoint never makes a TLS connection: leave out the
        // system's root certificates, whose loading is most of a CLI
        // command's start-up (~50 ms). Any TLS connection would be refused.
        let plain = TlsContext::builder()
            .with_trust_store(TrustStore::empty())
            .build();
        http = http.tls_context(plain.expect("an empty trust store is valid"));
    }
    let http = http.build_https();
    let mut b = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(args.region.clone()))
        .http_client(http)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build(),
        )
        .stalled_stream_protection(
            StalledStreamProtectionConfig::enabled()
                .grace_period(Duration::from_secs(30))
                .build(),
        )
        .force_path_style(args.path_style);
    if let Some(endpoint) = &args.endpoint_url {
        validate_endpoint(endpoint)?;
        b = b.endpoint_url(endpoint.trim_end_matches('/'));
    }
    match (&args.access_key_id, &args.secret_access_key) {
        (Some(id), Some(secret)) => {
            b = b.credentials_provider(Credentials::new(
                id.expose(),
                secret.expose(),
                None,
                None,
                "prefab-config",
            ));
        }
        (None, None) => {}
        _ => return Err(ClientError::PartialCredentials),
    }
    let retry = super::RetryPolicy::with_budget(args.retry_budget);
    let client = aws_sdk_s3::Client::from_conf(b.build());
    let endpoint = args.endpoint_url.as_deref().unwrap_or("AWS S3");
    Ok(super::Storage::from_client(
        client,
        endpoint,
        retry,
        args.checksum,
    ))
}

fn validate_endpoint(endpoint: &str) -> Result<(), ClientError> {
    let bad = || ClientError::Endpoint(endpoint.to_owned());
    let uri: http::Uri = endpoint.parse().map_err(|_| bad())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if !scheme_ok || uri.host().is_none() || !path_ok {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_paths_are_refused() {
        assert!(validate_endpoint("http://127.0.0.1:8333").is_ok());
        assert!(validate_endpoint("https://s3.oss-cn-hangzhou.aliyuncs.com/").is_ok());
        assert!(validate_endpoint("http://host:9000/bucket").is_err());
        assert!(validate_endpoint("host:9000").is_err());
        assert!(validate_endpoint("ftp://host").is_err());
    }
}
