//! `prefab dev` as a newcomer uses it: started as a child process, driven
//! with the `prefab` client binary, restarted on the same folder.

use crate::common;

use std::{path::Path, process::Output, time::Duration};

use common::{free_port, wait_for};

struct Dev {
    child: std::process::Child,
    gateway: String,
}

impl Dev {
    fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    fn start_with(data_dir: &Path, args: &[&str]) -> Self {
        let (g, s, p) = (free_port(), free_port(), free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
            .args(["dev", "--data-dir"])
            .arg(data_dir)
            .arg(format!("--gateway-addr=127.0.0.1:{g}"))
            .arg(format!("--s3-addr=127.0.0.1:{s}"))
            .arg(format!("--prefab-addr=127.0.0.1:{p}"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start prefab dev");
        Self {
            child,
            gateway: format!("http://127.0.0.1:{g}"),
        }
    }

    fn prefab(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
            .args(args)
            .env("PREFAB_GATEWAY", &self.gateway)
            .output()
            .expect("run the client")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.prefab(args);
        assert!(
            out.status.success(),
            "prefab {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn wait_healthy(&self) {
        for _ in 0..500 {
            if self.prefab(&["health"]).status.success() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("prefab dev never became healthy");
    }

    fn stop(mut self) {
        // SIGTERM, as Ctrl-C or Kubernetes would.
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "prefab dev exited with {status}");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_whole_flow_and_keeps_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let input = tmp.path().join("poem.txt");
    let text = "the quick brown fox\njumps over the lazy dog\n".repeat(5000);
    std::fs::write(&input, &text).unwrap();

    let dev = Dev::start(&data);
    dev.wait_healthy().await;
    let url = dev.ok(&["put", input.to_str().unwrap()]).trim().to_owned();
    assert!(
        url.starts_with("s3://prefab-outputs/uploads/") && url.ends_with("/poem.txt"),
        "{url}"
    );

    let out_dir = tmp.path().join("out");
    let json = dev.ok(&[
        "run",
        "hello-world-prefab",
        "uppercase",
        "--input",
        &format!("text={url}"),
        "--download",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let events: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.first().unwrap()["accepted"]["requestId"].is_string());
    assert!(events.last().unwrap()["runCompleted"].is_object());
    let completed = events.iter().find(|e| e["callCompleted"].is_object()).unwrap();
    let output_url = completed["callCompleted"]["outputs"]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let downloaded = std::fs::read_to_string(out_dir.join("output.txt")).unwrap();
    assert_eq!(downloaded, text.to_uppercase());
    // `watch` follows it again by its request id, from its journal.
    let request_id = events[0]["accepted"]["requestId"].as_str().unwrap();
    let watched = dev.ok(&["watch", request_id, "--json"]);
    let watched: Vec<serde_json::Value> = watched
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(watched.last().unwrap()["runCompleted"].is_object());
    assert!(watched.contains(completed), "{watched:?}");

    // A pipeline from a request file, as grpcurl takes it: the upper-cased
    // text, never uploaded, hashed by the next call.
    let pipeline = tmp.path().join("pipeline.json");
    let request = serde_json::json!({"calls": [
        {"prefabId": "hello-world-prefab", "functionName": "uppercase",
         "inputs": {"text": url}, "intermediate": ["output"]},
        {"prefabId": "hello-world-prefab", "version": "1.0.0", "functionName": "sha256",
         "inputs": {"file": "call://0/output"}},
    ]});
    std::fs::write(&pipeline, request.to_string()).unwrap();
    let hashed = dev.ok(&["run", "--request", pipeline.to_str().unwrap()]);
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.to_uppercase()));
    assert!(hashed.contains(&digest), "{hashed}");
    let typo = tmp.path().join("typo.json");
    std::fs::write(
        &typo,
        r#"{"calls": [{"prefabId": "p", "functionName": "f", "input": {}}]}"#,
    )
    .unwrap();
    let refused = dev.prefab(&["run", "--request", typo.to_str().unwrap()]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("unknown field \"input\" in calls[0]"), "{said}");

    // A local file as input is uploaded first.
    let counted = dev.ok(&[
        "run",
        "hello-world-prefab",
        "word_count",
        "-i",
        &format!("text={}", input.display()),
    ]);
    assert!(
        counted.contains("\"words\": 45000") && !counted.contains(".0"),
        "whole numbers as integers: {counted}"
    );
    let counted: serde_json::Value = serde_json::from_str(&counted).unwrap();
    assert_eq!(counted["words"], serde_json::json!(45000));
    assert_eq!(counted["lines"], serde_json::json!(10000));

    // Exit codes a script can use.
    assert_eq!(
        dev.prefab(&["run", "hello-world-prefab", "fail", "-i", "message=boom"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(dev.prefab(&["run", "no-such-prefab", "x"]).status.code(), Some(3));
    dev.stop();

    // Same folder, new process: the object is still there. (With a runtime
    // of the caller's own that is not running.)
    let gone = format!("gone@1.0.0=http://127.0.0.1:{}", free_port());
    let dev = Dev::start_with(&data, &["--endpoint", &gone]);
    dev.wait_healthy().await;
    // UNAVAILABLE with the gateway's RetryInfo: worth a retry, and when.
    let unavailable = dev.prefab(&["run", "gone", "x"]);
    let told = String::from_utf8_lossy(&unavailable.stderr);
    assert_eq!(unavailable.status.code(), Some(5), "{told}");
    assert!(told.contains("retry in 1 s"), "{told}");
    let again = tmp.path().join("again.txt");
    dev.ok(&["get", &output_url, again.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text.to_uppercase());
    // Into a folder, under the object's own name, leaving no partial file.
    let folder = tmp.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    dev.ok(&["get", &output_url, folder.to_str().unwrap()]);
    let name = output_url.rsplit('/').next().unwrap();
    assert_eq!(common::list(&folder), vec![folder.join(name)]);
    assert_eq!(
        std::fs::read_to_string(folder.join(name)).unwrap(),
        text.to_uppercase()
    );
    // To standard output the object's bytes stand alone, even with --json.
    assert_eq!(dev.ok(&["get", &output_url, "-", "--json"]), text.to_uppercase());
    // A folder is not a file to upload; the local error is the one told.
    let refused = dev.prefab(&["put", folder.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not a regular file"),
        "{refused:?}"
    );
    let workspaces = data.join("workspaces");
    wait_for("no workspace left", || common::list(&workspaces).is_empty()).await;
    dev.stop();
}
