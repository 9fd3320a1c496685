"""Interoperability check with a gRPC client nobody here wrote.

Python grpcio stubs are generated from proto/ at run time; the script talks
to a running `prefab dev` whose gateway address is the first argument (and,
with two more, to the Python prefab's runtime at that address, serving that
workspace root), and prints a closing line "N passed, N failed".
"""

import sys
import tempfile
import subprocess
import pathlib
import importlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def generate_stubs(out: pathlib.Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "prefab/v1/runtime.proto",
        "prefab/v1/gateway.proto",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for pkg in (out / "prefab", out / "prefab" / "v1"):
        (pkg / "__init__.py").touch()


def check_python_runtime(check, address, workspace_root):
    """The Python prefab's own contract checks: handles, paths, symlinks."""
    import uuid

    import grpc

    runtime_pb2 = importlib.import_module("prefab.v1.runtime_pb2")
    runtime_pb2_grpc = importlib.import_module("prefab.v1.runtime_pb2_grpc")
    runtime = runtime_pb2_grpc.PrefabRuntimeStub(grpc.insecure_channel(address))

    def invoke(workspace, text):
        request = runtime_pb2.InvokeRequest(workspace=workspace, function_name="word_count")
        request.arguments.update({"text": text})
        try:
            return list(runtime.Invoke(request, timeout=30)), None
        except grpc.RpcError as e:
            return None, e

    ws = str(uuid.uuid4())
    inputs = pathlib.Path(workspace_root) / ws / "inputs" / "0"
    inputs.mkdir(parents=True)
    (inputs / "real.txt").write_text("one two\nthree\n")
    (inputs / "link.txt").symlink_to("/etc/passwd")
    events, _ = invoke(ws, "inputs/0/real.txt")
    result = events[-1].result.outputs if events else None
    check("python runtime counts a staged input", result and result["words"] == 3, str(events))
    for name, workspace, text, code in [
        ("a handle that is a path", "../../etc", "inputs/0/real.txt", grpc.StatusCode.INVALID_ARGUMENT),
        ("an unknown workspace", str(uuid.uuid4()), "inputs/0/real.txt", grpc.StatusCode.NOT_FOUND),
        ("a path out of inputs/", ws, "inputs/../../x", grpc.StatusCode.INVALID_ARGUMENT),
        ("a symlinked input", ws, "inputs/0/link.txt", grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        _, error = invoke(workspace, text)
        check(f"python runtime refuses {name}", error is not None and error.code() == code,
              str(error and (error.code(), error.details())))


def main() -> int:
    target = sys.argv[1]
    stubs = pathlib.Path(tempfile.mkdtemp())
    generate_stubs(stubs)
    sys.path.insert(0, str(stubs))

    import grpc
    from google.protobuf import json_format
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gateway_pb2 = importlib.import_module("prefab.v1.gateway_pb2")
    gateway_pb2_grpc = importlib.import_module("prefab.v1.gateway_pb2_grpc")

    results = []

    def check(name, cond, detail=""):
        results.append(bool(cond))
        print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "prefab.v1.Gateway"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        check(f"health {service or '(server)'} is SERVING", resp.status == health_pb2.HealthCheckResponse.SERVING)

    # grpcio-reflection speaks grpc.reflection.v1alpha only, as grpcurl
    # 1.8.6 and several GUI clients do.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    reflected = ProtoReflectionDescriptorDatabase(channel)
    services = reflected.get_services()
    check("v1alpha reflection lists prefab.v1.Gateway", "prefab.v1.Gateway" in services, str(services))
    gateway_file = reflected.FindFileContainingSymbol("prefab.v1.Gateway")
    methods = [m.name for s in gateway_file.service if s.name == "Gateway" for m in s.method]
    check("v1alpha reflection resolves the Gateway's methods", "Run" in methods and "Watch" in methods, str(methods))

    gateway = gateway_pb2_grpc.GatewayStub(channel)
    text = b"interop from python\n" * 1000

    def chunks():
        yield gateway_pb2.PutFileRequest(header=gateway_pb2.PutFileHeader(file_name="py.txt", size=len(text)))
        for i in range(0, len(text), 4096):
            yield gateway_pb2.PutFileRequest(chunk=text[i : i + 4096])

    ref = gateway.PutFile(chunks(), timeout=60)
    check("PutFile stores the file", ref.size == len(text) and ref.url.endswith("/py.txt"), str(ref))

    request = json_format.ParseDict(
        {
            "calls": [
                {
                    "prefabId": "hello-world-prefab",
                    "version": "1.0.0",
                    "functionName": "word_count",
                    "inputs": {"text": ref.url},
                }
            ]
        },
        gateway_pb2.RunRequest(),
    )
    events = list(gateway.Run(request, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    check("Run starts with accepted", kinds[0] == "accepted", str(kinds))
    check("Run ends with run_completed", kinds[-1] == "run_completed", str(kinds))
    done = [e.call_completed for e in events if e.WhichOneof("event") == "call_completed"]
    outputs = json_format.MessageToDict(done[0].outputs) if done else {}
    check("word_count counts", outputs == {"words": 3000, "lines": 1000, "bytes": len(text)}, str(outputs))

    got = b"".join(c.data for c in gateway.GetFile(gateway_pb2.GetFileRequest(url=ref.url), timeout=60))
    check("GetFile returns the bytes", got == text)

    # The Python prefab (examples/prefabs/python) behind the same gateway.
    def run(function):
        call = {"prefabId": "hello-python", "version": "1.0.0", "functionName": function, "inputs": {"text": ref.url}}
        return list(gateway.Run(json_format.ParseDict({"calls": [call]}, gateway_pb2.RunRequest()), timeout=120))

    events = run("word_count")
    done = [e.call_completed for e in events if e.WhichOneof("event") == "call_completed"]
    outputs = json_format.MessageToDict(done[0].outputs) if done else {}
    check("hello-python word_count counts", outputs == {"words": 3000, "lines": 1000, "bytes": len(text)}, str(outputs))
    progress = [e for e in events if e.WhichOneof("event") == "runtime_progress"]
    check("hello-python reports progress", progress, str([e.WhichOneof("event") for e in events]))
    events = run("uppercase")
    done = [e.call_completed for e in events if e.WhichOneof("event") == "call_completed"]
    url = json_format.MessageToDict(done[0].outputs).get("output", "") if done else ""
    check("hello-python uppercase uploads its output", url.endswith(".txt"), str(events[-1:]))
    if url:
        got = b"".join(c.data for c in gateway.GetFile(gateway_pb2.GetFileRequest(url=url), timeout=60))
        check("hello-python uppercase output is the input upper-cased", got == text.upper())

    if len(sys.argv) > 3:
        check_python_runtime(check, sys.argv[2], sys.argv[3])

    try:
        list(gateway.Run(gateway_pb2.RunRequest(), timeout=10))
        check("an empty run is refused", False)
    except grpc.RpcError as e:
        check("an empty run is INVALID_ARGUMENT", e.code() == grpc.StatusCode.INVALID_ARGUMENT, str(e.code()))

    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
