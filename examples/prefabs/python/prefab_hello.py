"""A prefab in Python: the PrefabRuntime contract implemented without the Rust SDK.

    python3 examples/prefabs/python/prefab_hello.py --port 50053 --workspace-root .prefab-dev/workspaces

Needs grpcio, grpcio-tools, grpcio-health-checking and protobuf; the stubs
are generated from proto/ at start. Serves prefab `hello-python` 1.0.0:

  word_count(text: InputFile) -> {words, lines, bytes}
  uppercase(text: InputFile) -> output: OutputFile (txt)

and gRPC health (the server and `prefab.v1.PrefabRuntime`). What every
runtime must do, whatever its language (see the README, "Write a prefab in
any language"):

- The workspace is a handle (a UUID), never a path: resolve it under your
  own workspace root, refuse anything else.
- File arguments are workspace-relative paths, inputs under `inputs/`,
  outputs under `outputs/`; open them one component at a time without
  following symbolic links (anyone with the shared volume could plant one).
- Outputs (and folders made for them) are group-readable and -writable
  (0660, 2770) and nothing is world-readable: the gateway, another user in
  the workspace group, uploads and removes them.
- Report progress and log lines as events; end with one result that names
  every output file under its parameter's name.
- Stop when the call is cancelled (the caller left, the deadline passed).
- Refusals the caller cannot fix are FAILED_PRECONDITION (a permission the
  deployment must grant), bad arguments INVALID_ARGUMENT, an unknown
  workspace NOT_FOUND.
"""

import argparse
import errno
import os
import pathlib
import signal
import stat
import sys
import tempfile
import threading
import uuid
from concurrent import futures

ID, VERSION = "hello-python", "1.0.0"
CHUNK = 256 << 10
PROTO = pathlib.Path(__file__).resolve().parents[3] / "proto"


def generate_stubs(proto: pathlib.Path) -> None:
    """Generates prefab.v1 stubs into a temporary folder on sys.path."""
    import grpc_tools
    from grpc_tools import protoc

    out = pathlib.Path(tempfile.mkdtemp(prefix="prefab-stubs-"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}",
            "prefab/v1/runtime.proto"]
    if protoc.main(args) != 0:
        raise SystemExit(f"cannot generate stubs from {proto}")
    for pkg in (out / "prefab", out / "prefab" / "v1"):
        (pkg / "__init__.py").touch()
    sys.path.insert(0, str(out))


class Refused(Exception):
    """A call refused with a gRPC status code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def explain_denied(doing, path):
    ids = f"uid {os.getuid()}, gid {os.getgid()}, groups {sorted(os.getgroups())}"
    return (f"{doing} {path}: permission denied for this process ({ids}); run the prefab with the "
            "workspace group (runAsGroup, the gateway's PREFAB_WORKSPACE_GID)")


class Workspace:
    """A workspace folder opened by handle, and the files in it opened without following links."""

    DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, root, handle):
        import grpc

        try:
            if str(uuid.UUID(handle)) != handle:
                raise ValueError
        except ValueError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"workspace handle {handle!r} is not a request id")
        self.path = pathlib.Path(root) / handle
        try:
            self.fd = os.open(self.path, self.DIR_FLAGS)
        except FileNotFoundError:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no workspace {handle}")
        except PermissionError:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, explain_denied("cannot open the workspace", self.path))
        except OSError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"workspace {handle}: {e.strerror}")

    def close(self):
        os.close(self.fd)

    def _parts(self, name, rel, under):
        import grpc

        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or parts[0] != under or len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"file parameter {name!r} must be a path under {under}/, got {rel!r}")
        return parts

    def _folder(self, parts, create):
        """Opens the folders of `parts` one by one (making them if `create`); returns the last one's fd."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                if create:
                    try:
                        os.mkdir(part, 0o770, dir_fd=fd)
                        made = os.open(part, self.DIR_FLAGS, dir_fd=fd)
                        os.fchmod(made, 0o2770)
                        os.close(made)
                    except FileExistsError:
                        pass
                child = os.open(part, self.DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _refuse(self, name, rel, doing, e):
        import grpc

        if isinstance(e, PermissionError):
            return Refused(grpc.StatusCode.FAILED_PRECONDITION, explain_denied(doing, self.path / rel))
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            return Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{name!r} at {rel}: a symbolic link or something else is in the way; refusing it")
        return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{name!r} at {rel}: {e.strerror}")

    def open_input(self, name, rel):
        parts = self._parts(name, rel, "inputs")
        try:
            folder = self._folder(parts[:-1], create=False)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
            finally:
                os.close(folder)
        except OSError as e:
            raise self._refuse(name, rel, f"cannot read input {name!r} at", e)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            import grpc

            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"input {name!r} at {rel} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def create_output(self, name, rel):
        parts = self._parts(name, rel, "outputs")
        try:
            folder = self._folder(parts[:-1], create=True)
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(parts[-1], flags, 0o660, dir_fd=folder)
            finally:
                os.close(folder)
        except OSError as e:
            raise self._refuse(name, rel, f"cannot create output {name!r} at", e)
        os.fchmod(fd, 0o660)  # whatever the umask
        return os.fdopen(fd, "wb")


def make_servicer(pb, pb_grpc, root):
    import grpc
    from google.protobuf import struct_pb2

    P = pb.ParamType

    def param(name, kind, **kw):
        return pb.Parameter(name=name, type=kind, **kw)

    manifest = pb.Manifest(id=ID, version=VERSION, description="Hello, in Python", functions=[
        pb.Function(name="word_count", description="Counts words, lines and bytes",
                    parameters=[param("text", P.PARAM_TYPE_INPUT_FILE, required=True)],
                    outputs=[param("words", P.PARAM_TYPE_NUMBER), param("lines", P.PARAM_TYPE_NUMBER),
                             param("bytes", P.PARAM_TYPE_NUMBER)]),
        pb.Function(name="uppercase", description="Upper-cases a text file",
                    parameters=[param("text", P.PARAM_TYPE_INPUT_FILE, required=True),
                                param("output", P.PARAM_TYPE_OUTPUT_FILE, extension="txt")]),
    ])

    def progress(done, total, message):
        return pb.InvokeEvent(progress=pb.Progress(fraction=done / max(total, 1), message=message))

    def result(values):
        outputs = struct_pb2.Struct()
        outputs.update(values)
        return pb.InvokeEvent(result=pb.InvokeResult(outputs=outputs))

    def chunks(file, context):
        while True:
            if not context.is_active():
                raise Refused(grpc.StatusCode.CANCELLED, "the call was cancelled")
            chunk = file.read(CHUNK)
            if not chunk:
                return
            yield chunk

    def word_count(ws, args, context):
        with ws.open_input("text", args.get("text")) as text:
            total = os.fstat(text.fileno()).st_size
            words = lines = size = 0
            in_word = False
            for chunk in chunks(text, context):
                lines += chunk.count(b"\n")
                # A word cut by the chunk's edge counts once.
                words += len(chunk.split()) - (in_word and not chunk[:1].isspace())
                in_word = not chunk[-1:].isspace()
                size += len(chunk)
                yield progress(size, total, "counting")
        yield result({"words": words, "lines": lines, "bytes": size})

    def uppercase(ws, args, context):
        with ws.open_input("text", args.get("text")) as text:
            total = os.fstat(text.fileno()).st_size
            with ws.create_output("output", args.get("output")) as out:
                done = 0
                for chunk in chunks(text, context):
                    out.write(chunk.upper())
                    done += len(chunk)
                    yield progress(done, total, "upper-casing")
        yield result({"output": args["output"]})

    functions = {"word_count": word_count, "uppercase": uppercase}

    class Runtime(pb_grpc.PrefabRuntimeServicer):
        def Describe(self, request, context):
            return pb.DescribeResponse(manifest=manifest)

        def Invoke(self, request, context):
            function = functions.get(request.function_name)
            if function is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"prefab {ID} has no function {request.function_name!r}")
            try:
                ws = Workspace(root, request.workspace)
            except Refused as e:
                context.abort(e.code, str(e))
            try:
                args = dict(request.arguments.items())
                yield from function(ws, args, context)
            except Refused as e:
                context.abort(e.code, str(e))
            finally:
                ws.close()

    return Runtime()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workspace-root", default=os.environ.get("WORKSPACE_ROOT", "/mnt/prefab-workspace"))
    parser.add_argument("--proto", type=pathlib.Path, default=PROTO)
    opts = parser.parse_args()
    os.umask(0o007)
    generate_stubs(opts.proto)

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    pb = __import__("prefab.v1.runtime_pb2", fromlist=["_"])
    pb_grpc = __import__("prefab.v1.runtime_pb2_grpc", fromlist=["_"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_PrefabRuntimeServicer_to_server(make_servicer(pb, pb_grpc, opts.workspace_root), server)
    health_servicer = health.HealthServicer()
    for service in ("", "prefab.v1.PrefabRuntime"):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{opts.host}:{opts.port}")
    server.start()
    print(f"{ID} {VERSION} serving on {opts.host}:{port}, workspaces in {opts.workspace_root}", flush=True)

    stopped = threading.Event()

    def stop(*_):
        # Not ready for new calls; the ones in flight get the grace period.
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=30).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()


if __name__ == "__main__":
    main()
