//! `prefab deploy render`: the Knative Service of a prefab, with the shared
//! workspace volume mounted at the gateway's path, the h2c port, gRPC
//! probes and the labels the gateway's endpoint template resolves.

use serde_json::{Value, json};

use crate::manifest::is_dns_label;

/// Namespace prefabs and the gateway live in.
pub const NAMESPACE: &str = "prefab-functions";
/// The shared volume's claim.
pub const PVC: &str = "prefab-workspace";
/// Where the shared volume is mounted.
pub const MOUNT: &str = "/mnt/prefab-workspace";
/// The writable scratch folder of a read-only container (an `emptyDir`),
/// and its `HOME`: tools that exec prefabs wrap write temporary files (and
/// caches under `HOME`) even when their outputs go to the workspace.
pub const SCRATCH: &str = "/tmp";
/// The workspace group of the manifests in `k8s/`: the gateway image's
/// (distroless `nonroot`) primary group.
pub const WORKSPACE_GID: u32 = 65532;

/// Settings of `prefab deploy render`.
#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// Prefab id; the Knative Service is named after it.
    #[arg(long)]
    pub id: String,
    /// Prefab version; names the revision and labels the pods.
    #[arg(long)]
    pub version: String,
    /// Container image serving the prefab's runtime.
    #[arg(long)]
    pub image: String,
    /// Extra environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Secret whose keys become environment variables (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Longest call, in seconds (Knative's timeoutSeconds).
    #[arg(long, default_value_t = 3600)]
    pub timeout_seconds: u64,
    /// The workspace group (the gateway's `PREFAB_WORKSPACE_GID`): the
    /// prefab's processes run with it as their group, so that they can read
    /// staged inputs and write outputs the gateway then uploads and removes,
    /// whatever user id the image runs as.
    #[arg(long, default_value_t = WORKSPACE_GID)]
    pub workspace_gid: u32,
    /// The user id the prefab runs as (runAsUser), if not the image's.
    #[arg(long, value_name = "UID")]
    pub run_as_user: Option<u32>,
    /// Arguments for the container, e.g. `runtime exec --manifest /app/prefab.toml`.
    #[arg(long = "arg")]
    pub args: Vec<String>,
    /// Pipe the result to `kubectl apply -f -` instead of printing it.
    #[arg(long)]
    pub apply: bool,
}

/// Why a prefab cannot be rendered.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

/// The Knative Service of a prefab as a JSON value.
pub fn knative_service(args: &RenderArgs) -> Result<Value, RenderError> {
    if !is_dns_label(&args.id) {
        let hint = if is_dns_label(&args.id.to_ascii_lowercase()) {
            format!("; did you mean {:?}?", args.id.to_ascii_lowercase())
        } else {
            String::new()
        };
        return Err(RenderError(format!(
            "prefab id {:?} is not a Kubernetes name: use at most 63 lower-case letters, digits and '-'{hint}",
            args.id
        )));
    }
    let revision = format!("{}-{}", args.id, dns_version(&args.version)?);
    if revision.len() > 63 {
        return Err(RenderError(format!(
            "revision name {revision:?} is longer than 63 characters; shorten the id or the version"
        )));
    }
    if args.image.is_empty() || args.image.chars().any(char::is_whitespace) {
        return Err(RenderError(format!(
            "image {:?} is not a container image reference",
            args.image
        )));
    }
    let mut env = vec![
        json!({"name": "WORKSPACE_ROOT", "value": MOUNT}),
        json!({"name": "HOME", "value": SCRATCH}),
    ];
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| RenderError(format!("--env {kv:?} must look like KEY=VALUE")))?;
        env.push(json!({"name": k, "value": v}));
    }
    let env_from: Vec<Value> = args
        .secrets
        .iter()
        .map(|s| {
            if is_dns_label(s) {
                Ok(json!({"secretRef": {"name": s}}))
            } else {
                Err(RenderError(format!("secret name {s:?} is not a Kubernetes name")))
            }
        })
        .collect::<Result<_, _>>()?;
    let probe = |period: u64| {
        json!({
            "grpc": {"port": 8080, "service": "prefab.v1.PrefabRuntime"},
            "periodSeconds": period,
        })
    };
    let labels = json!({
        "app.kubernetes.io/name": args.id,
        "app.kubernetes.io/version": args.version,
        "app.kubernetes.io/part-of": "prefab",
        "prefab.dev/id": args.id,
        "networking.knative.dev/visibility": "cluster-local",
    });
    let mut container = json!({
        "name": "prefab",
        "image": args.image,
        "ports": [{"name": "h2c", "containerPort": 8080}],
        "env": env,
        "volumeMounts": [
            {"name": "workspace", "mountPath": MOUNT},
            {"name": "scratch", "mountPath": SCRATCH},
        ],
        "readinessProbe": probe(5),
        "livenessProbe": probe(10),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
        // Container-level runAsGroup: Knative accepts it without enabling
        // pod-level security contexts (fsGroup, supplementalGroups).
        "securityContext": {
            "runAsNonRoot": true,
            "runAsGroup": args.workspace_gid,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    });
    if let Some(uid) = args.run_as_user {
        container["securityContext"]["runAsUser"] = json!(uid);
    }
    if !env_from.is_empty() {
        container["envFrom"] = Value::Array(env_from);
    }
    if !args.args.is_empty() {
        container["args"] = json!(args.args);
    }
    Ok(json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": args.id, "namespace": NAMESPACE, "labels": labels},
        "spec": {"template": {
            "metadata": {
                "name": revision,
                "labels": {"prefab.dev/id": args.id, "app.kubernetes.io/version": args.version},
            },
            "spec": {
                "timeoutSeconds": args.timeout_seconds,
                "containers": [container],
                "volumes": [
                    {"name": "workspace", "persistentVolumeClaim": {"claimName": PVC}},
                    {"name": "scratch", "emptyDir": {}},
                ],
            },
        }},
    }))
}

/// A version as a DNS label fragment: lower-case, dots and underscores as
/// dashes (`1.0.0` → `1-0-0`).
fn dns_version(version: &str) -> Result<String, RenderError> {
    let mapped: String = version
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c == '.' || c == '_' { '-' } else { c })
        .collect();
    if is_dns_label(&mapped) {
        Ok(mapped)
    } else {
        Err(RenderError(format!(
            "version {version:?} cannot name a revision: use letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
        )))
    }
}

/// Renders JSON as block-style YAML (strings double-quoted, which YAML reads
/// exactly as JSON does).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    out
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                out.push_str(&format!("{pad}{k}:"));
                write_nested(v, indent, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&format!("{pad}-"));
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        let mut nested = String::new();
                        write_yaml(item, indent + 2, &mut nested);
                        out.push(' ');
                        out.push_str(nested.trim_start());
                    }
                    _ => write_nested(item, indent, out),
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{scalar}\n")),
    }
}

fn write_nested(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_yaml(v, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_yaml(v, indent + 2, out);
        }
        Value::Object(_) => out.push_str(" {}\n"),
        Value::Array(_) => out.push_str(" []\n"),
        scalar => out.push_str(&format!(" {scalar}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: &str, version: &str) -> RenderArgs {
        RenderArgs {
            id: id.into(),
            version: version.into(),
            image: "registry.example.com/hello:1.0.0".into(),
            env: vec!["MODE=fast".into()],
            secrets: vec!["hello-secrets".into()],
            timeout_seconds: 600,
            workspace_gid: 4242,
            run_as_user: Some(1000),
            args: vec!["runtime".into(), "hello".into()],
            apply: false,
        }
    }

    #[test]
    fn renders_the_volume_port_probes_and_names() {
        let svc = knative_service(&args("hello-world-prefab", "1.0.0")).unwrap();
        assert_eq!(svc["metadata"]["name"], "hello-world-prefab");
        assert_eq!(svc["metadata"]["namespace"], NAMESPACE);
        let spec = &svc["spec"]["template"]["spec"];
        assert_eq!(
            svc["spec"]["template"]["metadata"]["name"],
            "hello-world-prefab-1-0-0"
        );
        assert_eq!(spec["volumes"][0]["persistentVolumeClaim"]["claimName"], PVC);
        let c = &spec["containers"][0];
        assert_eq!(c["volumeMounts"][0]["mountPath"], MOUNT);
        assert_eq!(c["ports"][0], json!({"name": "h2c", "containerPort": 8080}));
        assert_eq!(c["readinessProbe"]["grpc"]["port"], 8080);
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "WORKSPACE_ROOT", "value": MOUNT}))
        );
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "MODE", "value": "fast"}))
        );
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "hello-secrets");
        assert_eq!(c["securityContext"]["runAsGroup"], 4242);
        assert_eq!(c["securityContext"]["runAsUser"], 1000);
        // Read-only: a scratch emptyDir for /tmp, HOME in it.
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["volumeMounts"][1]["mountPath"], SCRATCH);
        assert_eq!(spec["volumes"][1], json!({"name": "scratch", "emptyDir": {}}));
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "HOME", "value": SCRATCH}))
        );
    }

    #[test]
    fn refuses_names_kubernetes_would_reject() {
        let err = knative_service(&args("Hello", "1.0.0")).unwrap_err().to_string();
        assert!(err.contains("\"hello\""), "{err}");
        assert!(knative_service(&args("hello_world", "1")).is_err());
        assert!(knative_service(&args("hello", "1.0.0+build")).is_err());
        assert!(knative_service(&args(&"a".repeat(60), "1.0.0")).is_err());
        assert_eq!(dns_version("1.2.3_RC1").unwrap(), "1-2-3-rc1");
    }

    #[test]
    fn yaml_output_nests_maps_and_lists() {
        let yaml = to_yaml(&json!({"a": {"b": [1, {"c": "x", "d": []}]}, "e": "y:z"}));
        assert_eq!(
            yaml,
            "a:\n  b:\n    - 1\n    - c: \"x\"\n      d: []\ne: \"y:z\"\n"
        );
    }
}
