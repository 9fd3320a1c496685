//! Typed settings from command-line flags and environment variables, parsed
//! once at start-up and passed down.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

pub use prefab_sdk::secret::{Redactor, Secret};

/// Where object storage is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3-compatible endpoint, e.g. http://127.0.0.1:8333 (unset: AWS S3).
    #[arg(long = "s3-endpoint-url", env = "S3_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// Region used for signing (us-east-1 for MinIO-like stores, cn-hangzhou for OSS).
    #[arg(long = "s3-region", env = "S3_REGION")]
    pub region: Option<String>,
    /// Fallback region, as the AWS tools read it.
    #[arg(long = "aws-default-region", env = "AWS_DEFAULT_REGION", hide = true)]
    pub default_region: Option<String>,
    /// Bucket that outputs and uploads are written to.
    #[arg(long = "s3-bucket", env = "S3_BUCKET", default_value = "prefab-outputs")]
    pub bucket: String,
    /// Path-style addressing (MinIO, SeaweedFS: true; OSS: false). Default:
    /// true with a custom endpoint (but for Aliyun OSS's `*.aliyuncs.com`),
    /// false for AWS.
    #[arg(long = "s3-force-path-style", env = "S3_FORCE_PATH_STYLE")]
    pub force_path_style: Option<bool>,
    /// How uploads prove their bytes to the store: `auto` (CRC-64/NVME
    /// headers, `Content-MD5` once a store refuses them), `crc64nvme`, `md5`
    /// or `off`.
    #[arg(long = "s3-checksum", env = "S3_CHECKSUM", value_enum, default_value_t)]
    pub checksum: crate::storage::ChecksumMode,
    /// Seconds a transfer keeps retrying a failing store without progress
    /// (every byte that arrives starts them again).
    #[arg(
        long = "s3-retry-seconds",
        env = "PREFAB_S3_RETRY_SECONDS",
        default_value_t = 120
    )]
    pub retry_seconds: u64,
    /// Access key id.
    #[arg(long = "aws-access-key-id", env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub access_key_id: Option<Secret>,
    /// Secret access key.
    #[arg(
        long = "aws-secret-access-key",
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub secret_access_key: Option<Secret>,
}

impl S3Args {
    /// Whether requests name the bucket in the path rather than the host.
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or_else(|| {
            self.endpoint_url.as_deref().is_some_and(|endpoint| {
                let host = endpoint.parse::<http::Uri>().ok();
                let host = host.as_ref().and_then(http::Uri::host).unwrap_or_default();
                // Aliyun OSS refuses path-style (SecondLevelDomainForbidden).
                !host.ends_with(".aliyuncs.com")
            })
        })
    }

    /// The signing region: `S3_REGION`, else `AWS_DEFAULT_REGION`, else us-east-1.
    pub fn region(&self) -> &str {
        self.region
            .as_deref()
            .or(self.default_region.as_deref())
            .unwrap_or("us-east-1")
    }

    /// The store's settings, as [`crate::storage::connect`] takes them.
    pub fn settings(&self) -> crate::storage::Settings {
        crate::storage::Settings {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region().to_owned(),
            path_style: self.path_style(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            retry_budget: Duration::from_secs(self.retry_seconds),
            checksum: self.checksum,
        }
    }
}

/// Settings of `prefab gateway`.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address the gRPC server listens on.
    #[arg(long = "addr", env = "PREFAB_GATEWAY_ADDR", default_value = "0.0.0.0:50051")]
    pub addr: SocketAddr,
    /// Shared volume where per-request workspaces are created.
    #[arg(long, env = "WORKSPACE_ROOT", default_value = "/mnt/prefab-workspace")]
    pub workspace_root: PathBuf,
    /// File of bearer tokens, one per line (blank lines and # comments ignored).
    #[arg(long, env = "PREFAB_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// Serve without authentication (development only).
    #[arg(long, conflicts_with = "auth_tokens_file")]
    pub no_auth: bool,
    /// Buckets inputs may be read from, comma-separated; `*` allows any.
    /// Default: only the output bucket.
    #[arg(long, env = "PREFAB_ALLOWED_BUCKETS", value_delimiter = ',')]
    pub allowed_buckets: Vec<String>,
    /// Static endpoints, `id@version=http://host:port`, comma-separated;
    /// they take precedence over the template.
    #[arg(long, env = "PREFAB_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Endpoint of a prefab not listed in PREFAB_ENDPOINTS; `{id}` and
    /// `{version}` are replaced. Empty: only listed prefabs exist.
    #[arg(
        long,
        env = "PREFAB_ENDPOINT_TEMPLATE",
        default_value = "http://{id}.prefab-functions.svc.cluster.local"
    )]
    pub endpoint_template: String,
    /// How long a prefab's manifest is cached, in seconds.
    #[arg(long, env = "PREFAB_DESCRIBE_TTL_SECONDS", default_value_t = 60)]
    pub describe_ttl_seconds: u64,
    /// How long in-flight runs may finish after SIGTERM before they are
    /// cancelled and cleaned up, in seconds.
    #[arg(long, env = "PREFAB_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// This replica's name in workspace leases (default: host name and a
    /// random suffix).
    #[arg(long, env = "PREFAB_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds between janitor sweeps.
    #[arg(long, env = "PREFAB_JANITOR_INTERVAL_SECONDS", default_value_t = 300)]
    pub janitor_interval_seconds: u64,
    /// Seconds after which a workspace without a lease counts as abandoned.
    #[arg(long, env = "PREFAB_WORKSPACE_MAX_AGE_SECONDS", default_value_t = 3600)]
    pub workspace_max_age_seconds: u64,
    /// Seconds a workspace lease lasts; the owner renews it every third of that.
    #[arg(long, env = "PREFAB_LEASE_TTL_SECONDS", default_value_t = 600)]
    pub lease_ttl_seconds: u64,
    /// Most runs in flight on this replica.
    #[arg(long, env = "PREFAB_MAX_CONCURRENT_RUNS", default_value_t = 64)]
    pub max_concurrent_runs: usize,
    /// Largest single input in bytes.
    #[arg(long, env = "PREFAB_MAX_INPUT_BYTES", default_value_t = 100 << 30)]
    pub max_input_bytes: u64,
    /// Workspace reserved per input byte (inputs plus outputs).
    #[arg(long, env = "PREFAB_RESERVE_FACTOR", default_value_t = 2.0)]
    pub reserve_factor: f64,
    /// Fraction of the workspace volume runs may fill.
    #[arg(long, env = "PREFAB_HIGH_WATER", default_value_t = 0.9)]
    pub high_water: f64,
    /// Workspace budget in bytes, instead of the volume's size (for volumes
    /// that report a misleading size, such as some NAS).
    #[arg(long, env = "PREFAB_WORKSPACE_CAPACITY_BYTES")]
    pub workspace_capacity_bytes: Option<u64>,
    /// Address of the Prometheus `/metrics` endpoint; unset: not served.
    #[arg(long, env = "PREFAB_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Folder of prefab secrets: `<dir>/<prefab_id>/<NAME>` files are sent
    /// to that prefab only, as environment variables of each call.
    #[arg(long, env = "PREFAB_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Largest output file in bytes.
    #[arg(long, env = "PREFAB_MAX_OUTPUT_BYTES", default_value_t = 100 << 30)]
    pub max_output_bytes: u64,
    /// Seconds between checks of the token file for changes.
    #[arg(long, env = "PREFAB_AUTH_RELOAD_SECONDS", default_value_t = 5)]
    pub auth_reload_seconds: u64,
    /// Seconds a finished run's events stay available to `Watch`, on every
    /// replica.
    #[arg(long, env = "PREFAB_RUN_RETENTION_SECONDS", default_value_t = 300)]
    pub run_retention_seconds: u64,
    /// The group that owns every workspace, shared with the prefab pods
    /// (default: the gateway's primary group). The gateway must be a member.
    #[arg(long, env = "PREFAB_WORKSPACE_GID")]
    pub workspace_gid: Option<u32>,
    /// Whether callers may detach from runs (`ON_DISCONNECT_DETACH`).
    /// Where a replica may be stopped while no request is open (Knative
    /// scaling down), refuse it: a detached run would be cancelled with it.
    #[arg(long, env = "PREFAB_ALLOW_DETACH", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_detach: bool,
    /// Longest a run may take, in seconds, whatever deadline its caller set
    /// (or none, as a detached run may have): a hung prefab is cancelled
    /// and cleaned up then. 0 for no limit.
    #[arg(long, env = "PREFAB_MAX_RUN_SECONDS", default_value_t = 6 * 3600)]
    pub max_run_seconds: u64,
    /// TLS of the gRPC listener.
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
    /// TLS towards runtimes with `https://` endpoints.
    #[command(flatten)]
    pub runtime_tls: crate::tls::RuntimeTlsArgs,
    /// Object storage.
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(clap::Parser)]
struct GatewayFlags {
    #[command(flatten)]
    args: GatewayArgs,
}

impl GatewayArgs {
    /// Settings from `prefab gateway` flags (and the environment), for
    /// embedding the gateway.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv =
            std::iter::once(std::ffi::OsString::from("gateway")).chain(flags.into_iter().map(Into::into));
        <GatewayFlags as clap::Parser>::try_parse_from(argv).map(|f| f.args)
    }

    /// How long a cached manifest stays fresh.
    pub fn describe_ttl(&self) -> Duration {
        Duration::from_secs(self.describe_ttl_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oss_endpoints_are_virtual_hosted_and_others_path_style_by_default() {
        let args = |endpoint: Option<&str>, forced: Option<bool>| {
            let mut flags = Vec::new();
            flags.extend(endpoint.map(|e| format!("--s3-endpoint-url={e}")));
            flags.extend(forced.map(|f| format!("--s3-force-path-style={f}")));
            GatewayArgs::from_flags(flags).unwrap().s3
        };
        assert!(!args(Some("https://s3.oss-cn-hangzhou.aliyuncs.com"), None).path_style());
        assert!(args(Some("http://127.0.0.1:8333"), None).path_style());
        assert!(args(Some("http://minio.internal:9000"), None).path_style());
        assert!(!args(None, None).path_style(), "AWS S3");
        assert!(args(Some("https://s3.oss-cn-hangzhou.aliyuncs.com"), Some(true)).path_style());
        assert!(!args(Some("http://127.0.0.1:8333"), Some(false)).path_style());
    }
}
