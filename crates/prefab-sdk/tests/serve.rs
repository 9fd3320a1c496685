//! The SDK on its own, as a prefab author's crate uses it: a prefab served
//! with `prefab_sdk::serve` on a loopback port, called over gRPC with the
//! SDK's own generated client the way the gateway calls it.

use prefab_sdk::{
    Invocation, Outputs, Prefab, PrefabError,
    manifest::{FunctionSpec, Manifest, Param, ParamKind},
    proto::{self, invoke_event::Event, prefab_runtime_client::PrefabRuntimeClient},
    workspace::RequestId,
};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

/// Copies its input and says how long it was; masks nothing on purpose:
/// the SDK does, in what it sends back.
struct Echo;

impl Prefab for Echo {
    fn manifest(&self) -> Manifest {
        Manifest {
            id: "echo".into(),
            version: "1.0.0".into(),
            description: "Copies its input".into(),
            functions: vec![
                FunctionSpec::new("copy", "Copy a file")
                    .param(Param::new("src", ParamKind::InputFile))
                    .param(Param::new("dst", ParamKind::OutputFile).extension("bin"))
                    .output(Param::new("bytes", ParamKind::Number)),
                FunctionSpec::new("leak", "Fails with its secret in the message"),
            ],
        }
    }

    async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
        match call.function() {
            "copy" => {
                let mut src = tokio::fs::File::open(call.input("src")?).await?;
                call.progress(0.5, "copying").await;
                let mut dst = call.create_output("dst").await?;
                let bytes = tokio::io::copy(&mut src, &mut dst).await?;
                dst.flush().await?;
                Ok(json!({"bytes": bytes}).as_object().cloned().unwrap_or_default())
            }
            _ => Err(PrefabError::Failed(format!(
                "token {} refused",
                call.secret("TOKEN").unwrap_or_default()
            ))),
        }
    }
}

async fn served(
    root: &std::path::Path,
) -> (PrefabRuntimeClient<tonic::transport::Channel>, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(prefab_sdk::serve(
        Echo,
        root.to_owned(),
        listener,
        shutdown.clone(),
    ));
    let client = PrefabRuntimeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, shutdown)
}

/// An `Invoke` of `function` in workspace `id` with `arguments`.
fn request(id: RequestId, function: &str, arguments: serde_json::Value) -> proto::InvokeRequest {
    proto::InvokeRequest {
        workspace: id.to_string(),
        function_name: function.into(),
        arguments: arguments.as_object().cloned().map(proto::json_to_struct),
        ..Default::default()
    }
}

async fn invoke(
    client: &mut PrefabRuntimeClient<tonic::transport::Channel>,
    request: proto::InvokeRequest,
) -> Result<Vec<Event>, tonic::Status> {
    let mut stream = client.invoke(request).await?.into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.extend(event.event);
    }
    Ok(events)
}

#[tokio::test]
async fn a_prefab_served_by_the_sdk_alone_runs_in_its_workspace() {
    let root = tempfile::tempdir().unwrap();
    let (mut client, shutdown) = served(root.path()).await;

    let described = client
        .describe(proto::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    let manifest = described.manifest.unwrap();
    assert_eq!((manifest.id.as_str(), manifest.functions.len()), ("echo", 2));

    // A workspace as the gateway leaves it: the input staged, outputs empty.
    let id = RequestId::new();
    let ws = root.path().join(id.to_string());
    std::fs::create_dir_all(ws.join("inputs/0")).unwrap();
    std::fs::create_dir_all(ws.join("outputs/0")).unwrap();
    std::fs::write(ws.join("inputs/0/src.txt"), b"hello, prefab").unwrap();
    let arguments = json!({"src": "inputs/0/src.txt", "dst": "outputs/0/dst.bin"});
    let events = invoke(&mut client, request(id, "copy", arguments)).await.unwrap();
    assert!(
        matches!(&events[0], Event::Progress(p) if p.message == "copying"),
        "{events:?}"
    );
    let Some(Event::Result(result)) = events.last() else {
        panic!("no result: {events:?}");
    };
    let outputs = proto::struct_to_json(result.outputs.clone().unwrap());
    assert_eq!(outputs["bytes"], 13);
    assert_eq!(outputs["dst"], "outputs/0/dst.bin", "output files are reported");
    assert_eq!(
        std::fs::read(ws.join("outputs/0/dst.bin")).unwrap(),
        b"hello, prefab"
    );

    // What the SDK refuses before the function runs, and what it masks.
    let escape = json!({"src": "../../etc/passwd", "dst": "outputs/0/x.bin"});
    let refused = invoke(&mut client, request(id, "copy", escape))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let stranger = invoke(&mut client, request(RequestId::new(), "copy", json!({})))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), tonic::Code::NotFound, "{stranger:?}");
    let leak = proto::InvokeRequest {
        secrets: [("TOKEN".to_owned(), "s3cr3t-value".to_owned())].into(),
        ..request(id, "leak", json!({}))
    };
    let leaked = invoke(&mut client, leak).await.unwrap_err();
    assert_eq!(leaked.code(), tonic::Code::Unknown);
    assert!(!leaked.message().contains("s3cr3t-value"), "{leaked:?}");
    assert!(leaked.message().contains("[secret]"), "{leaked:?}");
    shutdown.cancel();
}
