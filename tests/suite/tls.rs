//! TLS on every hop: a client that trusts the CA talks to a TLS gateway,
//! which talks to a runtime that demands a client certificate (mutual TLS).

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::Code;

/// Writes a CA, and a server and a client certificate it signs, as PEM files.
fn certificates(dir: &Path) -> (PathBuf, [(PathBuf, PathBuf); 2]) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut pairs = Vec::new();
    for name in ["server", "client"] {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        pairs.push((c, k));
    }
    (ca_path, [pairs.remove(0), pairs.remove(0)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_mutual_tls_end_to_end() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, [(server_cert, server_key), (client_cert, client_key)]) = certificates(certs.path());
    let stack = Stack::start().await;
    let s = |p: &Path| p.display().to_string();

    // The runtime: TLS, and only clients with a certificate from the CA.
    let runtime_port = free_port();
    let mut runtime = tokio::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .args(["runtime", "hello", "--addr", &format!("127.0.0.1:{runtime_port}")])
        .args([
            "--tls-cert",
            &s(&server_cert),
            "--tls-key",
            &s(&server_key),
            "--tls-client-ca",
            &s(&ca),
        ])
        .env("WORKSPACE_ROOT", &stack.workspace_root)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The gateway: TLS for its callers, mutual TLS towards the runtime.
    let port = free_port();
    let endpoint = format!("--endpoints=hello-world-prefab@1.0.0=https://localhost:{runtime_port}");
    let mut gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .arg("gateway")
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg("--no-auth")
        .arg(format!("--workspace-root={}", stack.workspace_root.display()))
        .arg(&endpoint)
        .arg("--endpoint-template=")
        .arg(format!("--allowed-buckets={INPUT_BUCKET}"))
        .arg(format!("--s3-endpoint-url={}", stack.s3_endpoint))
        .args(["--tls-cert", &s(&server_cert), "--tls-key", &s(&server_key)])
        .args([
            "--runtime-tls-ca",
            &s(&ca),
            "--runtime-tls-cert",
            &s(&client_cert),
        ])
        .args(["--runtime-tls-key", &s(&client_key)])
        .env("AWS_ACCESS_KEY_ID", prefab::dev::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", prefab::dev::s3::SECRET_KEY)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = stack.put_input("tls/a.txt", b"secure words here".to_vec()).await;

    // The client binary, trusting the CA.
    let gateway_url = format!("https://localhost:{port}");
    let client = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
            .args(args)
            .env("PREFAB_GATEWAY", &gateway_url)
            .env("PREFAB_TLS_CA", &ca)
            .output()
            .unwrap()
    };
    let mut healthy = false;
    for _ in 0..250 {
        if client(&["health"]).status.success() {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    assert!(healthy, "the TLS gateway never became healthy");
    let out = client(&[
        "run",
        "hello-world-prefab",
        "word_count",
        "-i",
        &format!("text={url}"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let outputs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outputs["words"], serde_json::json!(3));

    // Without PREFAB_TLS_CA the client trusts the system's authorities:
    // not the test CA, unless the system's bundle (SSL_CERT_FILE) holds it.
    let system = |bundle: Option<&Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prefab"));
        cmd.arg("health")
            .env("PREFAB_GATEWAY", &gateway_url)
            .env_remove("PREFAB_TLS_CA");
        if let Some(bundle) = bundle {
            cmd.env("SSL_CERT_FILE", bundle);
        }
        cmd.output().unwrap()
    };
    assert!(!system(None).status.success());
    let out = system(Some(&ca));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Plain text is refused by the TLS gateway.
    let plain = std::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .arg("health")
        .env("PREFAB_GATEWAY", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // A gateway without a client certificate is refused by the runtime.
    let (_plain_gateway, mut without_cert) = stack
        .gateway_process_with(&[&endpoint, "--runtime-tls-ca", &s(&ca)], None)
        .await;
    let status = run_to_end(
        &mut without_cert,
        run_request("word_count", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    common::stop(&mut gateway).await;
    runtime.kill().await.unwrap();
}
