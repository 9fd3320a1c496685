//! Attacks, each refused: a prefab reporting outputs outside its workspace,
//! tokens used beyond their scope, hostile workspace handles, secrets
//! crossing prefabs, and credentials leaking into logs.

use crate::common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use common::*;
use prefab::{
    manifest::{FunctionSpec, Manifest, Param, ParamKind},
    proto::{self, prefab_runtime_client::PrefabRuntimeClient},
    runtime::{Invocation, Outputs, Prefab, PrefabError, RuntimeService},
};
use tonic::Code;

/// A prefab that reports whatever output path its `mode` argument asks for.
struct Evil {
    secret: PathBuf,
    flipping: Arc<AtomicBool>,
}

impl Prefab for Evil {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "evil".into(),
            version: "1.0.0".into(),
            description: String::new(),
            functions: vec![
                FunctionSpec::new("attack", "")
                    .param(Param::new("mode", ParamKind::String))
                    .param(Param::new("output", ParamKind::OutputFile).extension("txt")),
            ],
        }
    }

    async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
        let out = call.output("output")?.to_owned();
        let outputs_dir = out.parent().unwrap().parent().unwrap().to_owned();
        let report = |p: &str| Ok(Outputs::from_iter([("output".to_owned(), serde_json::json!(p))]));
        match call.str_arg("mode")? {
            "dotdot" => report("outputs/../../../../etc/passwd"),
            "absolute" => report("/etc/passwd"),
            "other-run" => report("../00000000-0000-4000-8000-000000000000/outputs/0/output.txt"),
            "symlink" => {
                std::os::unix::fs::symlink(&self.secret, &out)?;
                report("outputs/0/output.txt")
            }
            "dir-symlink" => {
                std::fs::create_dir_all(outputs_dir.join("real"))?;
                std::os::unix::fs::symlink(self.secret.parent().unwrap(), outputs_dir.join("link"))?;
                report(&format!(
                    "outputs/link/{}",
                    self.secret.file_name().unwrap().to_string_lossy()
                ))
            }
            "fifo" => {
                rustix::fs::mknodat(rustix::fs::CWD, &out, rustix::fs::FileType::Fifo, 0o600.into(), 0)
                    .map_err(std::io::Error::from)?;
                report("outputs/0/output.txt")
            }
            "device" => report("outputs/null"),
            "swap" => {
                // Flip the output between a harmless file and a link to the
                // secret while the gateway collects it.
                std::fs::write(&out, b"harmless")?;
                let (flag, secret, path) = (Arc::clone(&self.flipping), self.secret.clone(), out.clone());
                flag.store(true, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let tmp_file = path.with_extension("tmpf");
                    let tmp_link = path.with_extension("tmpl");
                    while flag.load(Ordering::SeqCst) {
                        let _ = std::fs::write(&tmp_file, b"harmless");
                        let _ = std::fs::rename(&tmp_file, &path);
                        let _ = std::os::unix::fs::symlink(&secret, &tmp_link);
                        let _ = std::fs::rename(&tmp_link, &path);
                    }
                });
                report("outputs/0/output.txt")
            }
            "many" => {
                std::fs::write(&out, b"x")?;
                Ok((0..10_000)
                    .map(|i| (format!("extra{i}"), serde_json::json!(i)))
                    .collect())
            }
            "loud" => {
                // Far longer than any line the gateway passes on.
                call.log(proto::LogStream::Stderr, "y".repeat(1 << 20)).await;
                std::fs::write(&out, b"harmless")?;
                Ok(Outputs::new())
            }
            "huge" => {
                std::fs::write(&out, b"x")?;
                Ok([("output".to_owned(), serde_json::json!("x".repeat(2 << 20)))]
                    .into_iter()
                    .collect())
            }
            _ => Err(PrefabError::InvalidArgument("unknown mode".into())),
        }
    }
}

async fn start_evil(stack: &Stack, secret: &Path) -> (String, Arc<AtomicBool>) {
    let flipping = Arc::new(AtomicBool::new(false));
    let evil = Evil {
        secret: secret.to_owned(),
        flipping: Arc::clone(&flipping),
    };
    let service = RuntimeService::new(Arc::new(evil), stack.workspace_root.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(service.serve(listener, tokio_util::sync::CancellationToken::new()));
    (format!("http://{addr}"), flipping)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefab_cannot_make_the_gateway_upload_what_is_not_its_output() {
    let port = free_port();
    let stack = Stack::start_with(&[&format!("--endpoints=evil@1.0.0=http://127.0.0.1:{port}")]).await;
    let secret = stack.tmp.path().join("gateway-secret.txt");
    std::fs::write(&secret, "TOP-SECRET-CONTENT").unwrap();
    // The evil runtime must listen where the gateway expects it.
    let flipping = Arc::new(AtomicBool::new(false));
    let evil = Evil {
        secret: secret.clone(),
        flipping: Arc::clone(&flipping),
    };
    let service = RuntimeService::new(Arc::new(evil), stack.workspace_root.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(service.serve(listener, tokio_util::sync::CancellationToken::new()));
    let _ = start_evil;

    let mut client = stack.client().await;
    for (mode, needle) in [
        ("dotdot", "not allowed"),
        ("absolute", "must be relative"),
        ("other-run", "not allowed"),
        ("symlink", "not a regular file"),
        ("dir-symlink", "symbolic link"),
        ("fifo", "not a regular file"),
        ("device", "does not exist"),
        ("many", "undeclared"),
        ("huge", "results are limited"),
    ] {
        let req = call_request("evil", "attack", serde_json::json!({ "mode": mode }));
        let status = run_to_end(&mut client, req).await.expect_err(mode);
        assert_eq!(status.code(), Code::FailedPrecondition, "{mode}: {status:?}");
        assert!(
            status.message().contains("evil@1.0.0 misbehaved"),
            "{mode}: {}",
            status.message()
        );
        assert!(status.message().contains(needle), "{mode}: {}", status.message());
        assert!(!status.message().contains("TOP-SECRET"), "{mode}");
    }
    // A megabyte-long log line reaches the caller cut to 16 KiB.
    let req = call_request("evil", "attack", serde_json::json!({ "mode": "loud" }));
    let events = run_to_end(&mut client, req).await.expect("loud");
    let lines: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            proto::run_event::Event::RuntimeLog(l) => Some(l.line.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].len() < 17 << 10, "{} bytes passed on", lines[0].len());
    assert!(lines[0].ends_with(&format!(" [{} more bytes cut]", (1 << 20) - (16 << 10))));
    // The race: whatever the gateway got, it never uploads the secret.
    for _ in 0..20 {
        let req = call_request("evil", "attack", serde_json::json!({ "mode": "swap" }));
        let result = run_to_end(&mut client, req).await;
        flipping.store(false, Ordering::SeqCst);
        if let Ok(events) = result {
            let url = call_outputs(&events)["output"].as_str().unwrap().to_owned();
            assert_eq!(stack.get(&url).await, b"harmless");
        }
    }
    // Nothing of the refused runs reached the bucket.
    let outputs = stack.tmp.path().join("s3").join(BUCKET).join("outputs");
    for dir in list(&outputs) {
        for file in list(&dir) {
            assert_eq!(std::fs::read(&file).unwrap(), b"harmless", "{}", file.display());
        }
    }
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_refuses_hostile_handles_and_paths() {
    let stack = Stack::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", stack.runtime_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut runtime = PrefabRuntimeClient::new(channel);
    let invoke = |workspace: &str, text: &str| proto::InvokeRequest {
        workspace: workspace.into(),
        function_name: "word_count".into(),
        arguments: Some(proto::json_to_struct(
            serde_json::json!({ "text": text }).as_object().unwrap().clone(),
        )),
        ..Default::default()
    };
    for handle in [
        "..",
        "/etc",
        "../x",
        "",
        "./",
        "00000000-0000-4000-8000-00000000000/..",
    ] {
        let status = runtime
            .invoke(invoke(handle, "inputs/0/a.txt"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{handle:?}: {status:?}");
    }
    let ws = stack.workspace_root.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(ws.join("inputs")).unwrap();
    let handle = ws.file_name().unwrap().to_string_lossy().into_owned();
    for path in [
        "../../etc/passwd",
        "/etc/passwd",
        "inputs/../../x",
        "outputs/a.txt",
    ] {
        let status = runtime.invoke(invoke(&handle, path)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{path:?}: {status:?}");
    }
    std::os::unix::fs::symlink("/etc/passwd", ws.join("inputs/link.txt")).unwrap();
    let status = runtime
        .invoke(invoke(&handle, "inputs/link.txt"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // An output path taken in advance (a link to somewhere the function's
    // writes would escape to) is refused before the function runs.
    std::fs::write(ws.join("inputs/a.txt"), "some words").unwrap();
    std::fs::create_dir_all(ws.join("outputs/0")).unwrap();
    let escape = stack.tmp.path().join("escaped.txt");
    std::os::unix::fs::symlink(&escape, ws.join("outputs/0/out.txt")).unwrap();
    let mut upper = invoke(&handle, "inputs/a.txt");
    upper.function_name = "uppercase".into();
    upper.arguments = Some(proto::json_to_struct(
        serde_json::json!({ "text": "inputs/a.txt", "output": "outputs/0/out.txt" })
            .as_object()
            .unwrap()
            .clone(),
    ));
    let status = runtime.invoke(upper.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("already exists"), "{status:?}");
    assert!(!escape.exists());
    std::fs::remove_dir_all(&ws).unwrap();
}

const SECRET_A: &str = "sk-live-AAAA-1111-only-for-prefab-a";

/// A secrets folder under `dir` giving prefab-a its `API_KEY`.
fn secrets_dir(dir: &Path) -> PathBuf {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(secrets.join("prefab-a")).unwrap();
    std::fs::write(secrets.join("prefab-a/API_KEY"), format!("{SECRET_A}\n")).unwrap();
    secrets
}

const PREFAB_A: &str = r#"
id = "prefab-a"
version = "1.0.0"
[[function]]
name = "check"
parameters = []
exec = { command = ["sh", "-c", "test \"$API_KEY\" = 'sk-live-AAAA-1111-only-for-prefab-a' || {{ echo wrong secret >&2; exit 1; }}"] }
"#;

const LEAKY: &str = r#"
id = "prefab-a"
version = "1.0.0"
[[function]]
name = "leak"
parameters = []
exec = { command = ["sh", "-c", "echo \"::progress 0.5 using $API_KEY\"; echo \"key=$API_KEY\" >&2; exit 1"] }

[[function]]
name = "tell"
parameters = []
outputs = [{ name = "note", type = "string" }]
exec = { command = ["sh", "-c", "echo \"::output note the key is $API_KEY\""] }
"#;

const PREFAB_B: &str = r#"
id = "prefab-b"
version = "1.0.0"
[[function]]
name = "check"
parameters = []
exec = { command = ["sh", "-c", "test -z \"$API_KEY\" || {{ echo leaked >&2; exit 1; }}"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_secrets_and_logs_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = secrets_dir(tmp.path());
    let stack = Stack::start_full(
        &[
            &format!("--secrets-dir={}", secrets.display()),
            "--auth-reload-seconds=1",
        ],
        &[PREFAB_A, PREFAB_B],
    )
    .await;
    let mut client = stack.client().await;

    // Secrets reach prefab A, and only A.
    for prefab in ["prefab-a", "prefab-b"] {
        run_to_end(&mut client, call_request(prefab, "check", serde_json::json!({})))
            .await
            .unwrap_or_else(|s| panic!("{prefab}: {s:?}"));
    }

    // Scoped tokens, added to the token file while the gateway runs.
    let tokens = stack.tmp.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{TOKEN}\nscoped-token-only-a run:prefab-a\nfiles-token files\n"),
    )
    .unwrap();
    let mut accepted = false;
    for _ in 0..100 {
        let req = authed_as(
            "scoped-token-only-a",
            call_request("prefab-a", "check", serde_json::json!({})),
        );
        if client.run(req).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(accepted, "the reloaded token file was not picked up");
    let req = authed_as(
        "scoped-token-only-a",
        call_request("prefab-b", "check", serde_json::json!({})),
    );
    let status = client.run(req).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("prefab-b"), "{}", status.message());
    let get = proto::GetFileRequest {
        url: format!("s3://{BUCKET}/x"),
        ..Default::default()
    };
    let status = client
        .get_file(authed_as("scoped-token-only-a", get.clone()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client.get_file(authed_as("files-token", get)).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "files scope passes auth: {status:?}"
    );
    let req = authed_as(
        "files-token",
        call_request("prefab-a", "check", serde_json::json!({})),
    );
    assert_eq!(client.run(req).await.unwrap_err().code(), Code::PermissionDenied);
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_token_or_secret_reaches_the_logs() {
    let stack = Stack::start().await;
    let tokens = stack.tmp.path().join("log-tokens");
    let token = "tok-3c1f9a7e5b2d4c6e8f0a1b2c3d4e5f60";
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let log = stack.tmp.path().join("gateway-debug.log");
    // A gateway process logging at debug level, with a token file instead of --no-auth.
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .arg("gateway")
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg(format!("--auth-tokens-file={}", tokens.display()))
        .arg(format!("--workspace-root={}", stack.workspace_root.display()))
        .arg(format!(
            "--endpoints=hello-world-prefab@1.0.0=http://{}",
            stack.runtime_addr
        ))
        .arg("--endpoint-template=")
        .arg(format!("--allowed-buckets={INPUT_BUCKET}"))
        .arg(format!("--s3-endpoint-url={}", stack.s3_endpoint))
        .env("AWS_ACCESS_KEY_ID", prefab::dev::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", prefab::dev::s3::SECRET_KEY)
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut client = None;
    for _ in 0..500 {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            client = Some(proto::gateway_client::GatewayClient::new(ch));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut client = client.unwrap();
    let url = stack.put_input("log/a.txt", b"one two".to_vec()).await;
    let req = run_request("word_count", serde_json::json!({ "text": url }));
    let mut stream = client
        .run(authed_as(token, req.clone()))
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    let wrong = "tok-wrong-0000000000000000000000000";
    assert!(client.run(authed_as(wrong, req)).await.is_err());
    child.kill().await.unwrap();

    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        text.contains("run completed"),
        "the log is not what was expected:\n{text}"
    );
    for needle in [token, wrong, prefab::dev::s3::SECRET_KEY] {
        assert!(!text.contains(needle), "{needle} leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefab_that_prints_its_secret_does_not_hand_it_on() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = secrets_dir(tmp.path());
    let stack = Stack::start_full(&[&format!("--secrets-dir={}", secrets.display())], &[LEAKY]).await;
    let mut client = stack.client().await;
    let mut stream = client
        .run(authed(call_request("prefab-a", "leak", serde_json::json!({}))))
        .await
        .unwrap()
        .into_inner();
    let mut said = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(msg)) => match msg.event {
                Some(proto::run_event::Event::RuntimeLog(l)) => said.push(l.line),
                Some(proto::run_event::Event::RuntimeProgress(p)) => said.push(p.message),
                _ => {}
            },
            Ok(None) => panic!("the run must fail"),
            Err(status) => break status,
        }
    };
    said.push(status.message().to_owned());
    assert!(
        said.iter().all(|s| !s.contains(SECRET_A)),
        "the secret was passed on: {said:?}"
    );
    assert!(said.contains(&"key=[secret]".to_owned()), "{said:?}");
    assert!(said.contains(&"using [secret]".to_owned()), "{said:?}");
    assert!(status.message().contains("key=[secret]"), "{status:?}");
    // Nor in an output value.
    let events = run_to_end(
        &mut client,
        call_request("prefab-a", "tell", serde_json::json!({})),
    )
    .await
    .unwrap();
    assert_eq!(call_outputs(&events)["note"], "the key is [secret]");
    stack.wait_idle().await;
}
