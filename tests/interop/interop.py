"""Interoperability check with a gRPC client nobody here wrote.

Python grpcio stubs are generated from proto/ at run time; the script talks
to a running `prefab dev` whose gateway address is the first argument, and
prints a closing line "N passed, N failed".
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
