//! One shared volume as a cluster uses it: prefab runtimes under other user
//! ids than the gateway's (sharing only the workspace group, or not), and
//! several gateway processes on one workspace root and one store. Each part
//! is a real `prefab` process; the tests drop to other ids, so they need
//! root (CI runs as root) and are skipped with a note otherwise.

use crate::common;

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    BUCKET, INPUT_BUCKET, authed, call, connect, list, outputs, request, run_to_end, start_listening, url_of,
    wait_for,
};
use prefab::{
    dev,
    proto::{self, gateway_client::GatewayClient, run_event::Event},
};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// The workspace group, as the manifests set it (distroless `nonroot`).
const GROUP: u32 = 65532;

/// Who a process runs as.
#[derive(Debug, Clone, Copy)]
struct Ids {
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

const GATEWAY: Ids = Ids {
    uid: GROUP,
    gid: GROUP,
    groups: &[],
};

/// A prefab image's user with the workspace group added.
const PREFAB_USER: Ids = Ids {
    uid: 1000,
    gid: 1000,
    groups: &[GROUP],
};

/// A root prefab on NFS with root squash: `nobody`, keeping its groups.
const SQUASHED_ROOT: Ids = Ids {
    uid: 65534,
    gid: 65534,
    groups: &[GROUP],
};

/// A prefab whose pod was deployed without the workspace group.
const STRANGER: Ids = Ids {
    uid: 1001,
    gid: 1001,
    groups: &[],
};

/// An exec prefab that lists the workspace (path, mode, group) into its
/// output, written by the program itself, and leaves a folder of its own.
const INSPECT: &str = r#"
id = "inspect"
version = "1.0.0"
description = "Lists the workspace"

[[function]]
name = "list"
description = "List the workspace"
parameters = [
  { name = "file", type = "InputFile" },
  { name = "output", type = "OutputFile", extension = "txt" },
]
exec = { command = ["sh", "-c", "mkdir outputs/made && touch outputs/made/x && find . -printf '%y %m %g %p\n' > \"$1\"", "sh", "{output}"] }

[[function]]
name = "hold"
description = "Holds an input for a few seconds"
parameters = [
  { name = "file", type = "InputFile" },
  { name = "seconds", type = "number" },
]
exec = { command = ["sleep", "{seconds}"] }
"#;

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root to start processes under other user ids");
    false
}

/// A workspace volume, store and `prefab` binary that other users can reach.
struct Volume {
    /// The FUSE mount the volume is reached through, if it is; unmounted
    /// before the folder it is in goes.
    _fuse: Option<FuseMount>,
    tmp: tempfile::TempDir,
    bin: PathBuf,
    root: PathBuf,
    s3_endpoint: String,
    s3: prefab::storage::Storage,
    _stop: StopOnDrop,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A folder mounted elsewhere through `bindfs` (FUSE), unmounted on drop.
struct FuseMount(PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        if !unmounted.is_ok_and(|s| s.success()) {
            eprintln!("cannot unmount {}", self.0.display());
        }
    }
}

/// How the volume's root is reached.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mount {
    /// Directly, on the local file system.
    Local,
    /// Through FUSE, which `fstatfs` tells apart from a local file system as
    /// it does NFS.
    Fuse,
}

impl Volume {
    async fn new() -> Self {
        Self::mounted(Mount::Local).await
    }

    async fn mounted(mount: Mount) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // The test binary's folder is root's: link the binary where others
        // can run it (copy if the link crosses file systems).
        let bin_dir = tmp.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_dir.join("prefab");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_prefab"), &bin).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_prefab"), &bin).unwrap();
        }
        std::fs::write(bin_dir.join("inspect.toml"), INSPECT).unwrap();
        // The volume's root as Kubernetes mounts it with fsGroup: the
        // workspace group's, group-writable and setgid.
        let root = tmp.path().join("workspaces");
        std::fs::create_dir(&root).unwrap();
        rustix::fs::chown(&root, None, Some(rustix::fs::Gid::from_raw(GROUP))).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2770)).unwrap();
        let fuse = match mount {
            Mount::Local => None,
            Mount::Fuse => {
                // The volume's folder, seen through bindfs at `root`: owners,
                // modes and links pass through, every user reaches it.
                let source = tmp.path().join("volume");
                std::fs::rename(&root, &source).unwrap();
                std::fs::create_dir(&root).unwrap();
                let mounted = std::process::Command::new("bindfs")
                    .args(["-o", "allow_other"])
                    .arg(&source)
                    .arg(&root)
                    .status()
                    .expect("bindfs runs (.ci/run installs it)");
                assert!(mounted.success(), "bindfs could not mount the volume");
                Some(FuseMount(root.clone()))
            }
        };

        let stop = CancellationToken::new();
        let (s3_addr, _) = dev::s3::spawn(
            &tmp.path().join("s3"),
            &[BUCKET, INPUT_BUCKET],
            "127.0.0.1:0".parse().unwrap(),
            stop.clone(),
        )
        .await
        .expect("embedded S3 starts");
        let s3_endpoint = format!("http://{s3_addr}");
        let s3 = prefab::storage::connect(&common::s3_args(&s3_endpoint).settings()).unwrap();
        Self {
            _fuse: fuse,
            tmp,
            bin,
            root,
            s3_endpoint,
            s3,
            _stop: StopOnDrop(stop),
        }
    }

    /// Starts `prefab ARGS… --addr 127.0.0.1:<port>` as `ids` and waits
    /// until it listens.
    async fn start(&self, ids: Ids, args: &[String], log: &str) -> (Child, SocketAddr) {
        let command = |addr: SocketAddr| {
            let mut cmd = Command::new(&self.bin);
            cmd.args(args)
                .arg(format!("--addr={addr}"))
                .env("AWS_ACCESS_KEY_ID", dev::s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", dev::s3::SECRET_KEY)
                .env("RUST_LOG", "info");
            as_user(&mut cmd, ids);
            cmd
        };
        start_listening(command, &self.tmp.path().join(log)).await
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(name)).unwrap_or_default()
    }

    /// Starts the example prefab's runtime as `ids`.
    async fn hello(&self, ids: Ids) -> (Child, SocketAddr) {
        let args = ["runtime".into(), "hello".into(), self.root_flag()];
        self.start(ids, &args, "hello.log").await
    }

    /// Starts the inspecting exec prefab's runtime as `ids`.
    async fn inspect(&self, ids: Ids) -> (Child, SocketAddr) {
        let manifest = self.bin.with_file_name("inspect.toml");
        let args = [
            "runtime".into(),
            "exec".into(),
            format!("--manifest={}", manifest.display()),
            self.root_flag(),
        ];
        self.start(ids, &args, "inspect.log").await
    }

    fn root_flag(&self) -> String {
        format!("--workspace-root={}", self.root.display())
    }

    /// Starts a gateway as `ids` that reaches the given runtimes.
    async fn gateway(
        &self,
        ids: Ids,
        endpoints: &[(&str, SocketAddr)],
        extra: &[&str],
        log: &str,
    ) -> (Child, GatewayClient<Channel>) {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|(prefab, addr)| format!("{prefab}@1.0.0=http://{addr}"))
            .collect();
        let mut args = vec![
            "gateway".to_owned(),
            "--no-auth".into(),
            self.root_flag(),
            format!("--endpoints={}", endpoints.join(",")),
            "--endpoint-template=".into(),
            format!("--allowed-buckets={INPUT_BUCKET}"),
            format!("--s3-endpoint-url={}", self.s3_endpoint),
            format!("--s3-bucket={BUCKET}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, addr) = self.start(ids, &args, log).await;
        (child, connect(addr).await)
    }

    async fn put_input(&self, key: &str, data: Vec<u8>) -> String {
        let put = self.s3.put_object().bucket(INPUT_BUCKET).key(key);
        put.body(data.into()).send().await.expect("put input");
        format!("s3://{INPUT_BUCKET}/{key}")
    }

    /// The workspaces left on the volume (run records aside).
    fn workspaces(&self) -> Vec<PathBuf> {
        list(&self.root)
    }
}

/// Makes `cmd` run as `ids`.
fn as_user(cmd: &mut Command, ids: Ids) {
    let groups: Vec<libc::gid_t> = ids.groups.to_vec();
    // SAFETY: only async-signal-safe system calls between fork and exec,
    // on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(ids.gid) != 0
                || libc::setuid(ids.uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs every example function and the inspecting exec prefab with their
/// runtimes as `ids`, checking every output.
async fn run_everything_as(ids: Ids, mount: Mount) {
    let volume = Volume::mounted(mount).await;
    let (_hello, hello) = volume.hello(ids).await;
    let (_inspect, inspect) = volume.inspect(ids).await;
    let endpoints = [("hello-world-prefab", hello), ("inspect", inspect)];
    let (_gateway, mut client) = volume.gateway(GATEWAY, &endpoints, &[], "gateway.log").await;
    let text = common::text(300_000, 7);
    let url = volume.put_input("in.txt", text.clone()).await;

    let calls = vec![
        call(
            "hello-world-prefab",
            "word_count",
            serde_json::json!({ "text": url }),
        ),
        call(
            "hello-world-prefab",
            "uppercase",
            serde_json::json!({ "text": url }),
        ),
        call("hello-world-prefab", "sha256", serde_json::json!({ "file": url })),
        call(
            "hello-world-prefab",
            "sleep",
            serde_json::json!({ "seconds": 0.1 }),
        ),
        call("inspect", "list", serde_json::json!({ "file": url })),
        // A pipeline step: the output the runtime's user wrote, handed on
        // by the gateway's user (a hard link needs read and write access
        // to a file of another owner where fs.protected_hardlinks is on).
        call(
            "hello-world-prefab",
            "sha256",
            serde_json::json!({ "file": "call://1/output" }),
        ),
    ];
    let events = run_to_end(&mut client, request(calls))
        .await
        .unwrap_or_else(|s| panic!("run as {ids:?}: {s:?}\n{}", volume.log("gateway.log")));
    let out = outputs(&events);
    let words = String::from_utf8_lossy(&text).split_whitespace().count();
    assert_eq!(out[0]["words"], serde_json::json!(words));
    assert_eq!(
        common::get_object(&volume.s3, &url_of(&out[1], "output")).await,
        text.to_ascii_uppercase()
    );
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&text));
    assert_eq!(out[2]["sha256"], serde_json::json!(sha));
    assert_eq!(out[3]["slept"], serde_json::json!(0.1));
    let upper = text.to_ascii_uppercase();
    let sha_upper = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&upper));
    assert_eq!(out[5]["sha256"], serde_json::json!(sha_upper));

    // What the exec program saw: every folder shared and setgid, the staged
    // input group-readable, nothing for others, all in the workspace group.
    let listing = common::get_object(&volume.s3, &url_of(&out[4], "output")).await;
    let listing = String::from_utf8(listing).unwrap();
    let mut seen_input = false;
    for line in listing.lines() {
        let fields: Vec<&str> = line.splitn(4, ' ').collect();
        let (kind, mode, group, path) = (
            fields[0],
            u32::from_str_radix(fields[1], 8).unwrap(),
            fields[2],
            fields[3],
        );
        assert_eq!(group, GROUP.to_string(), "{line}\n{listing}");
        match kind {
            "d" => assert_eq!(mode, 0o2770, "{line}"),
            _ if path.starts_with("./inputs/") => {
                assert_eq!(mode, 0o640, "{line}");
                seen_input = true;
            }
            _ => assert_eq!(mode, 0o660, "{line}"),
        }
    }
    assert!(seen_input, "no group-readable input in\n{listing}");

    // The gateway removed every workspace, whoever wrote into it.
    wait_for("no workspace left", || volume.workspaces().is_empty()).await;

    // The fail function's error passes through as the function's own.
    let failed = run_to_end(
        &mut client,
        request(vec![call(
            "hello-world-prefab",
            "fail",
            serde_json::json!({ "message": "on purpose" }),
        )]),
    )
    .await
    .unwrap_err();
    assert!(failed.message().contains("on purpose"), "{failed:?}");

    // An input big enough for ranged GETs, streamed: the function, as this
    // user, is called while it is staged and reads it by its watermark.
    let big = common::big_text(24, 8);
    let big_url = volume.put_input("big.txt", big.clone()).await;
    let sha256 = call(
        "hello-world-prefab",
        "sha256",
        serde_json::json!({ "file": big_url }),
    );
    let events = run_to_end(&mut client, request(vec![sha256]))
        .await
        .unwrap_or_else(|s| panic!("streamed run as {ids:?}: {s:?}\n{}", volume.log("gateway.log")));
    let at = |is: fn(&Event) -> bool| events.iter().position(is).expect("the event was sent");
    assert!(
        at(|e| matches!(e, Event::Invoking(_))) < at(|e| matches!(e, Event::Staged(_))),
        "{events:?}"
    );
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big));
    assert_eq!(outputs(&events)[0]["sha256"], serde_json::json!(sha));
}

#[tokio::test]
async fn prefabs_under_another_uid_with_the_workspace_group_work() {
    if is_root() {
        run_everything_as(PREFAB_USER, Mount::Local).await;
    }
}

/// On a volume that is not a local file system, as NFS: the gateway writes
/// staged bytes back before it moves a watermark, a streaming reader opens
/// its input anew whenever the watermark moves and reads on a blocking
/// thread (FUSE refuses `RWF_NOWAIT`).
#[tokio::test]
async fn prefabs_work_on_a_volume_that_is_not_a_local_file_system() {
    if is_root() && has_bindfs() {
        run_everything_as(PREFAB_USER, Mount::Fuse).await;
    }
}

/// A live run's lease being renewed (replaced by rename, by another process
/// as by another replica) is never read as absent, which would make the run
/// look abandoned to the janitor: on FUSE, opens racing a rename miss the
/// name now and then.
#[tokio::test]
async fn a_lease_renewed_on_a_network_like_volume_is_never_read_as_absent() {
    use prefab::workspace::{WorkspaceRoot, lease::Lease, record::Records};
    if !(is_root() && has_bindfs()) {
        return;
    }
    let volume = Volume::mounted(Mount::Fuse).await;
    let records = Records::open(&WorkspaceRoot::new(&volume.root).unwrap()).unwrap();
    let id = prefab::workspace::RequestId::new();
    let pending = records.prepare(id).unwrap();
    let lease = Lease::new("replica-a", Duration::from_secs(60));
    let _record = records.create(pending, lease.clone()).unwrap();
    // The renewals come from another process, as from another replica.
    let script = "while :; do printf '%s' \"$1\" > \"$2.tmp\" && mv -f \"$2.tmp\" \"$2\"; done";
    let live = records.path().join(".live").join(id.to_string());
    let mut renewing = std::process::Command::new("sh")
        .args(["-c", script, "sh", &serde_json::to_string(&lease).unwrap()])
        .arg(&live)
        .spawn()
        .unwrap();
    let (reads, missed) = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(2);
        let (mut reads, mut missed) = (0, 0);
        while Instant::now() < until {
            reads += 1;
            if records.lease(id).is_none() {
                missed += 1;
            }
        }
        (reads, missed)
    })
    .await
    .unwrap();
    renewing.kill().unwrap();
    renewing.wait().unwrap();
    assert_eq!(missed, 0, "{missed} of {reads} reads found no lease");
}

fn has_bindfs() -> bool {
    if std::process::Command::new("bindfs")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    eprintln!("skipped: needs bindfs (FUSE), which .ci/run installs");
    false
}

#[tokio::test]
async fn a_root_prefab_squashed_to_nobody_works_with_the_group() {
    if is_root() {
        run_everything_as(SQUASHED_ROOT, Mount::Local).await;
    }
}

#[tokio::test]
async fn a_prefab_without_the_workspace_group_fails_as_a_deployment_problem() {
    if !is_root() {
        return;
    }
    let volume = Volume::new().await;
    let (_hello, hello) = volume.hello(STRANGER).await;
    let endpoints = [("hello-world-prefab", hello)];
    let (_gateway, mut client) = volume.gateway(GATEWAY, &endpoints, &[], "gateway.log").await;
    let url = volume.put_input("in.txt", b"some words\n".to_vec()).await;
    let status = run_to_end(
        &mut client,
        request(vec![call(
            "hello-world-prefab",
            "uppercase",
            serde_json::json!({ "text": url }),
        )]),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message();
    for part in [
        "permission denied",
        "uid 1001, gid 1001",
        &volume.root.display().to_string(),
        &format!("gid {GROUP} with mode 2770"),
        "supplementalGroups",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    wait_for("no workspace left", || volume.workspaces().is_empty()).await;
}

/// Starts a detached run and returns its request id.
async fn start_detached(client: &mut GatewayClient<Channel>, calls: Vec<proto::Call>) -> String {
    let mut req = request(calls);
    req.on_disconnect = proto::OnDisconnect::Detach as i32;
    let mut stream = client.run(authed(req)).await.expect("run accepted").into_inner();
    loop {
        let msg = stream.message().await.expect("stream ok").expect("an event");
        if let Some(Event::Accepted(a)) = msg.event {
            return a.request_id;
        }
    }
}

/// Follows run `id` with `Watch` to its end: its events (heartbeats left
/// out) and the status it ended with.
async fn watch(
    client: &mut GatewayClient<Channel>,
    id: &str,
) -> (Vec<proto::RunEvent>, Result<(), tonic::Status>) {
    let req = proto::WatchRequest {
        request_id: id.into(),
        after_sequence: 0,
    };
    let mut stream = match client.watch(authed(req)).await {
        Ok(stream) => stream.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(e)) if matches!(e.event, Some(Event::Heartbeat(_))) => {}
            Ok(Some(e)) => events.push(e),
            Ok(None) => return (events, Ok(())),
            Err(status) => return (events, Err(status)),
        }
    }
}

/// The events every reader must see alike (progress may be coalesced).
fn milestones(events: &[proto::RunEvent]) -> Vec<proto::RunEvent> {
    events
        .iter()
        .filter(|e| {
            !matches!(
                e.event,
                Some(
                    Event::Staging(_)
                        | Event::Uploading(_)
                        | Event::RuntimeProgress(_)
                        | Event::RuntimeLog(_)
                )
            )
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn gateway_replicas_share_runs_and_the_volume_budget() {
    if is_root() {
        replicas_share_runs_and_the_volume_budget(Mount::Local).await;
    }
}

/// The same on a volume that is not a local file system, where leases are
/// renewed by renames that a reader racing them can miss for an instant.
#[tokio::test]
async fn gateway_replicas_share_runs_on_a_volume_that_is_not_a_local_file_system() {
    if is_root() && has_bindfs() {
        replicas_share_runs_and_the_volume_budget(Mount::Fuse).await;
    }
}

async fn replicas_share_runs_and_the_volume_budget(mount: Mount) {
    let volume = Volume::mounted(mount).await;
    let (_hello, hello) = volume.hello(PREFAB_USER).await;
    let (_inspect, inspect) = volume.inspect(PREFAB_USER).await;
    let endpoints = [("hello-world-prefab", hello), ("inspect", inspect)];
    // A lease of 3 s renewed every second; a janitor sweep every second.
    let ttl = Duration::from_secs(3);
    let sweep = Duration::from_secs(1);
    let flags = |name: &'static str| {
        [
            format!("--replica-id={name}"),
            format!("--lease-ttl-seconds={}", ttl.as_secs()),
            format!("--janitor-interval-seconds={}", sweep.as_secs()),
            "--workspace-capacity-bytes=1000000".into(),
        ]
    };
    let start = |name: &'static str| {
        let flags = flags(name);
        let volume = &volume;
        async move {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            volume
                .gateway(GATEWAY, &endpoints, &flags, &format!("{name}.log"))
                .await
        }
    };
    let (mut a_proc, mut a) = start("replica-a").await;
    let (_b_proc, mut b) = start("replica-b").await;
    let (_c_proc, mut c) = start("replica-c").await;

    // A detached run started on A is followed to its end from B and C.
    let id = start_detached(
        &mut a,
        vec![call(
            "hello-world-prefab",
            "sleep",
            serde_json::json!({ "seconds": 2 }),
        )],
    )
    .await;
    let ((on_a, end_a), (on_b, end_b), (on_c, end_c)) =
        tokio::join!(watch(&mut a, &id), watch(&mut b, &id), watch(&mut c, &id));
    for end in [&end_a, &end_b, &end_c] {
        assert!(end.is_ok(), "{end:?}");
    }
    assert!(matches!(
        on_a.last().and_then(|e| e.event.as_ref()),
        Some(Event::RunCompleted(_))
    ));
    assert_eq!(
        milestones(&on_b),
        milestones(&on_a),
        "B saw other milestones than A"
    );
    assert_eq!(
        milestones(&on_c),
        milestones(&on_a),
        "C saw other milestones than A"
    );
    assert!(
        on_b.iter()
            .any(|e| matches!(e.event, Some(Event::RuntimeProgress(_))))
    );
    // Followed again after the end, from any replica.
    let (again, end) = watch(&mut c, &id).await;
    assert!(end.is_ok() && milestones(&again) == milestones(&on_a));

    // A streamed input (its watermark read by the runtime, as uid 1000),
    // run on B and followed to its end from C.
    let text = common::text(300_000, 9);
    let url = volume.put_input("streamed.txt", text.clone()).await;
    let id = start_detached(
        &mut b,
        vec![call(
            "hello-world-prefab",
            "word_count",
            serde_json::json!({ "text": url }),
        )],
    )
    .await;
    let ((on_b, end_b), (on_c, end_c)) = tokio::join!(watch(&mut b, &id), watch(&mut c, &id));
    assert!(end_b.is_ok() && end_c.is_ok(), "{end_b:?} {end_c:?}");
    assert_eq!(
        milestones(&on_c),
        milestones(&on_b),
        "C saw other milestones than B"
    );
    let words = String::from_utf8_lossy(&text).split_whitespace().count();
    let events: Vec<Event> = on_b.into_iter().filter_map(|e| e.event).collect();
    assert_eq!(outputs(&events)[0]["words"], serde_json::json!(words));

    // A run admitted on A that holds most of the budget makes B refuse one.
    let half = volume.put_input("half.bin", vec![7; 300_000]).await;
    let hold = |url: &str| {
        call(
            "inspect",
            "hold",
            serde_json::json!({ "file": url, "seconds": 30 }),
        )
    };
    let held = start_detached(&mut a, vec![hold(&half)]).await;
    let refused = run_to_end(&mut b, request(vec![hold(&half)])).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("reserved by 1 runs on this volume"),
        "{}",
        refused.message()
    );

    // A dies with the run: B says ABORTED, naming A, once A's lease expires.
    wait_running(&mut b, &held).await;
    a_proc.start_kill().unwrap();
    a_proc.wait().await.unwrap();
    let killed = Instant::now();
    let (_, end) = watch(&mut b, &held).await;
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("replica-a"), "{}", status.message());
    assert!(
        killed.elapsed() <= ttl + sweep + Duration::from_secs(2),
        "ABORTED after {:?}",
        killed.elapsed()
    );
    // Its workspace goes with the next sweep, and its space is free again.
    wait_for("the dead run's workspace removed", || {
        volume.workspaces().is_empty()
    })
    .await;
    let admitted = start_detached(&mut b, vec![hold(&half)]).await;
    assert!(!admitted.is_empty());
}

/// Follows run `id` on `client` until its runtime is invoked.
async fn wait_running(client: &mut GatewayClient<Channel>, id: &str) {
    let req = proto::WatchRequest {
        request_id: id.into(),
        after_sequence: 0,
    };
    let mut stream = client.watch(authed(req)).await.expect("watch").into_inner();
    loop {
        let msg = stream.message().await.expect("stream ok").expect("an event");
        if matches!(msg.event, Some(Event::Invoking(_))) {
            return;
        }
    }
}
