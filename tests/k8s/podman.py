"""Runs the product in containers the way Kubernetes runs it, and checks it.

A small kubelet: it reads the resources `kubectl kustomize` printed (the
Deployment overlay with the check's cluster settings, and the prefabs that
`prefab deploy render` produced) and starts each pod's containers with
podman, with the settings the manifests give: user and groups
(runAsUser/runAsGroup/fsGroup/supplementalGroups, runAsNonRoot enforced),
read-only root file system (without podman's own tmpfs mounts, so a missing
emptyDir shows), dropped capabilities, no privilege escalation, memory
limits, env and envFrom from the ConfigMaps and Secrets, volumes (the claim
as one host folder shared by every pod, emptyDir, secret), ports, command
and args; Knative Services get the PORT Knative sets. Pods share one podman
network where each Knative Service is reachable by its name. Probes are sent
as the kubelet sends them (grpc.health.v1 Check, the probe's service, 1 s).

Then, with a gRPC client nobody here wrote (Python grpcio): a Run of each
prefab through a gateway replica, outputs read back from the store (curl)
and checked byte for byte; SIGTERM to a replica in the middle of a run,
which must still finish within the grace period; and nothing left in the
volume. Any difference between the manifests and what the processes do
fails the check with a message that names it.

usage: podman.py RESOURCES.yaml --volume DIR --s3 URL --network NAME
"""

import argparse
import base64
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "interop"))
from interop import generate_stubs  # noqa: E402


class CheckFailed(Exception):
    pass


def podman(*args, check=True):
    proc = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])} ...: {proc.stderr.strip()}")
    return proc.stdout.strip()


class Pod:
    """One pod: its name, spec, kind, and each container's published ports."""

    def __init__(self, name, spec, kind, service):
        self.name, self.spec, self.kind, self.service = name, spec, kind, service
        self.containers = {}  # container name -> {container port: host port}

    def container_name(self, container):
        return f"{self.name}-{container['name']}"

    def grace(self):
        return int(self.spec.get("terminationGracePeriodSeconds", 30))


class Kubelet:
    def __init__(self, resources, volume, network, scratch):
        self.resources = resources
        self.volume, self.network, self.scratch = volume, network, scratch
        self.pods = []

    def find(self, kind, name):
        for r in self.resources:
            if r["kind"] == kind and r["metadata"]["name"] == name:
                return r
        raise CheckFailed(f"no {kind} named {name!r} in the manifests")

    def secret_data(self, name):
        secret = self.find("Secret", name)
        data = dict(secret.get("stringData", {}))
        for k, v in secret.get("data", {}).items():
            data[k] = base64.b64decode(v).decode()
        return data

    def env(self, container, knative):
        env = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.find("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
            elif "secretRef" in source:
                env.update(self.secret_data(source["secretRef"]["name"]))
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif "configMapKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["configMapKeyRef"]
                env[var["name"]] = self.find("ConfigMap", ref["name"])["data"][ref["key"]]
            elif "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secret_data(ref["name"])[ref["key"]]
        if knative:
            # What Knative sets in every revision's user container.
            env["PORT"] = str(container["ports"][0]["containerPort"])
            env["K_SERVICE"] = knative
        return env

    def user(self, pod_ctx, ctx, image, name):
        uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
        image_user = podman("image", "inspect", "--format", "{{.Config.User}}", image) or "0"
        image_uid, _, image_gid = image_user.partition(":")
        if uid is None:
            if not image_uid.isdigit():
                raise CheckFailed(
                    f"{name}: image {image} runs as user {image_uid!r}, not a number: the kubelet "
                    "cannot verify runAsNonRoot for it; use a numeric USER"
                )
            uid = int(image_uid)
        if gid is None:
            gid = int(image_gid) if image_gid.isdigit() else 0
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) and uid == 0:
            raise CheckFailed(f"{name}: runAsNonRoot is set but the container would run as root (uid 0)")
        return uid, gid

    def volume_args(self, pod, container, pod_dir):
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        args = []
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is None:
                raise CheckFailed(f"{pod.name}: volumeMount {mount['name']!r} names no volume of the pod")
            target, ro = mount["mountPath"], mount.get("readOnly", False)
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                self.find("PersistentVolumeClaim", claim)
                args += ["-v", f"{self.volume}:{target}" + (":ro" if ro else "")]
            elif "emptyDir" in volume:
                args += ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777"]
            elif "secret" in volume:
                folder = pod_dir / f"secret-{mount['name']}"
                folder.mkdir(exist_ok=True)
                for key, value in self.secret_data(volume["secret"]["secretName"]).items():
                    (folder / key).write_text(value)
                    (folder / key).chmod(0o444)
                folder.chmod(0o755)
                args += ["-v", f"{folder}:{target}:ro"]
            else:
                raise CheckFailed(f"{pod.name}: volume {mount['name']!r} is of a kind this check does not run")
        return args

    def start(self, pod):
        # Listed first, so that whatever of it started is removed at the end.
        self.pods.append(pod)
        pod_dir = self.scratch / pod.name
        pod_dir.mkdir()
        pod_ctx = pod.spec.get("securityContext", {})
        groups = [pod_ctx["fsGroup"]] if "fsGroup" in pod_ctx else []
        groups += pod_ctx.get("supplementalGroups", [])
        for container in pod.spec["containers"]:
            name = pod.container_name(container)
            ctx = container.get("securityContext", {})
            image = container["image"]
            uid, gid = self.user(pod_ctx, ctx, image, name)
            args = ["run", "--detach", "--pull", "never", "--name", name, "--hostname", pod.name]
            args += ["--network", self.network, "--user", f"{uid}:{gid}"]
            if pod.service:
                args += ["--network-alias", pod.service]
            args += [f"--group-add={g}" for g in groups]
            if ctx.get("readOnlyRootFilesystem"):
                # Nothing writable but what the manifest mounts.
                args += ["--read-only", "--read-only-tmpfs=false"]
            caps = ctx.get("capabilities", {})
            args += [f"--cap-drop={c}" for c in caps.get("drop", [])]
            args += [f"--cap-add={c}" for c in caps.get("add", [])]
            if ctx.get("allowPrivilegeEscalation") is False:
                args += ["--security-opt", "no-new-privileges"]
            memory = container.get("resources", {}).get("limits", {}).get("memory")
            if memory:
                args += ["--memory", memory.replace("Gi", "g").replace("Mi", "m")]
            for k, v in self.env(container, pod.service if pod.kind == "Knative" else None).items():
                args += ["--env", f"{k}={v}"]
            args += self.volume_args(pod, container, pod_dir)
            for port in container.get("ports", []):
                args += ["--publish", f"127.0.0.1::{port['containerPort']}"]
            if "command" in container:
                args += ["--entrypoint", json.dumps(container["command"])]
            args += [image, *container.get("args", [])]
            podman(*args)
            self.check_ids(name, uid, gid, groups)
            ports = {}
            for port in container.get("ports", []):
                out = podman("port", name, str(port["containerPort"]))
                ports[port["containerPort"]] = int(out.splitlines()[0].rsplit(":", 1)[1])
            pod.containers[container["name"]] = ports

    def check_ids(self, name, uid, gid, groups):
        """The container's process has the ids the manifest asks for."""
        pid = podman("inspect", "--format", "{{.State.Pid}}", name)
        status = dict(
            line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        got_uid, got_gid = int(status["Uid"].split()[0]), int(status["Gid"].split()[0])
        got_groups = {int(g) for g in status["Groups"].split()}
        if (got_uid, got_gid) != (uid, gid) or not set(groups) <= got_groups:
            raise CheckFailed(
                f"{name} runs as {got_uid}:{got_gid} groups {sorted(got_groups)}, "
                f"the manifest asks for {uid}:{gid} groups {groups}"
            )
        print(f"ok   {name} runs as {uid}:{gid}" + (f", groups {groups}" if groups else ""), flush=True)

    def logs(self, name, lines=15):
        proc = subprocess.run(["podman", "logs", "--tail", str(lines), name], capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip()

    def stop(self, pod, timeout=None):
        for container in pod.spec["containers"]:
            podman("stop", "--time", str(pod.grace() if timeout is None else timeout), pod.container_name(container))


def pods_of(resources):
    """The pods the workloads ask for: a Deployment's replicas, one per Knative Service."""
    pods = []
    for r in resources:
        name = r["metadata"]["name"]
        if r["kind"] == "Deployment":
            for i in range(r["spec"].get("replicas", 1)):
                pods.append(Pod(f"{name}-{i}", r["spec"]["template"]["spec"], "Deployment", None))
        elif r["kind"] == "Service" and r["apiVersion"].startswith("serving.knative.dev"):
            pods.append(Pod(name, r["spec"]["template"]["spec"], "Knative", name))
    return pods


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("resources")
    parser.add_argument("--volume", required=True, type=pathlib.Path)
    parser.add_argument("--s3", required=True, help="the store's endpoint as seen from the host")
    parser.add_argument("--network", required=True)
    opts = parser.parse_args()

    resources = [r for r in yaml.safe_load_all(open(opts.resources)) if r]
    scratch = pathlib.Path(tempfile.mkdtemp())
    stubs = scratch / "stubs"
    stubs.mkdir()
    generate_stubs(stubs)
    sys.path.insert(0, str(stubs))
    kubelet = Kubelet(resources, opts.volume, opts.network, scratch)
    try:
        Check(kubelet, opts).run()
    except CheckFailed as e:
        print(f"FAIL {e}")
        return 1
    finally:
        for pod in kubelet.pods:
            for container in pod.spec["containers"]:
                podman("rm", "--force", "--time", "0", pod.container_name(container), check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


class Check:
    def __init__(self, kubelet, opts):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.grpc, self.health_pb2, self.health_pb2_grpc = grpc, health_pb2, health_pb2_grpc
        self.gateway_pb2 = __import__("prefab.v1.gateway_pb2", fromlist=["_"])
        self.gateway_pb2_grpc = __import__("prefab.v1.gateway_pb2_grpc", fromlist=["_"])
        self.kubelet, self.opts = kubelet, opts
        config = kubelet.find("ConfigMap", "prefab-gateway")["data"]
        self.bucket = config["S3_BUCKET"]
        self.s3_keys = kubelet.secret_data("prefab-s3")
        self.token = kubelet.secret_data("prefab-gateway-tokens")["tokens"].split()[0]

    def ok(self, what):
        print(f"ok   {what}", flush=True)

    # -- the store, through curl (SigV4) -------------------------------------------------

    def s3(self, method, key, body=None):
        cmd = ["curl", "--silent", "--show-error", "--fail", "--request", method,
               "--aws-sigv4", "aws:amz:us-east-1:s3",
               "--user", f"{self.s3_keys['AWS_ACCESS_KEY_ID']}:{self.s3_keys['AWS_SECRET_ACCESS_KEY']}",
               f"{self.opts.s3}/{self.bucket}/{key}"]
        if body is not None:
            cmd[1:1] = ["--data-binary", "@-"]
        proc = subprocess.run(cmd, input=body, capture_output=True)
        if proc.returncode != 0:
            raise CheckFailed(f"S3 {method} {key}: {proc.stderr.decode().strip()}")
        return proc.stdout

    # -- probes --------------------------------------------------------------------------

    def probe(self, pod, container, probe):
        """One probe as the kubelet sends it: grpc.health.v1 Check, 1 s."""
        grpc_probe = probe.get("grpc")
        if grpc_probe is None:
            raise CheckFailed(f"{pod.name}: probe {probe} is not a gRPC probe; this check sends gRPC probes only")
        port = grpc_probe["port"]
        ports = pod.containers[container["name"]]
        if port not in ports:
            raise CheckFailed(
                f"{pod.name}: the probe's port {port} is not a containerPort of {container['name']} "
                f"(ports {sorted(ports)})"
            )
        channel = self.grpc.insecure_channel(f"127.0.0.1:{ports[port]}")
        try:
            stub = self.health_pb2_grpc.HealthStub(channel)
            request = self.health_pb2.HealthCheckRequest(service=grpc_probe.get("service", ""))
            reply = stub.Check(request, timeout=probe.get("timeoutSeconds", 1))
            return reply.status == self.health_pb2.HealthCheckResponse.SERVING, "status " + str(reply.status)
        except self.grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
        finally:
            channel.close()

    def wait_ready(self, pod, deadline=60):
        for container in pod.spec["containers"]:
            name = pod.container_name(container)
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                end = time.monotonic() + deadline
                while True:
                    ready, why = self.probe(pod, container, probe)
                    if ready:
                        break
                    state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name)
                    if time.monotonic() > end or not state.startswith("running"):
                        raise CheckFailed(self.diagnose(pod, container, kind, probe, why, state))
                    time.sleep(0.5)
                self.ok(f"{name}: {kind} (grpc port {probe['grpc']['port']}, "
                        f"service {probe['grpc'].get('service', '')!r}) SERVING")

    def diagnose(self, pod, container, kind, probe, why, state):
        name = pod.container_name(container)
        log = self.kubelet.logs(name)
        text = f"{name}: {kind} on grpc port {probe['grpc']['port']} failed ({why}); container {state}"
        listening = re.findall(r"(?:listening|serving)[^\n]*?(\d+\.\d+\.\d+\.\d+:\d+)", log, re.I)
        if listening and not any(a.endswith(f":{probe['grpc']['port']}") for a in listening):
            text += (f"; the process listens on {', '.join(sorted(set(listening)))}, not on the "
                     f"probe's port {probe['grpc']['port']}: the manifest's port and the process's address differ")
        return text + "\n--- last lines of its log:\n" + log

    # -- runs ----------------------------------------------------------------------------

    def gateway(self, pod):
        port = pod.containers["gateway"][8080]
        channel = self.grpc.insecure_channel(f"127.0.0.1:{port}")
        return channel, self.gateway_pb2_grpc.GatewayStub(channel)

    def call(self, stub, call, timeout=120):
        from google.protobuf import json_format

        request = json_format.ParseDict({"calls": [call]}, self.gateway_pb2.RunRequest())
        metadata = [("authorization", f"Bearer {self.token}")]
        return stub.Run(request, timeout=timeout, metadata=metadata)

    def outputs(self, events):
        from google.protobuf import json_format

        kinds = [e.WhichOneof("event") for e in events]
        if kinds[-1:] != ["run_completed"]:
            raise CheckFailed(f"the run ended with {kinds[-1:]}, events {kinds}")
        done = [e.call_completed for e in events if e.WhichOneof("event") == "call_completed"]
        return json_format.MessageToDict(done[0].outputs)

    def fetch(self, url):
        prefix = f"s3://{self.bucket}/"
        if not url.startswith(prefix):
            raise CheckFailed(f"output {url} is not in the bucket {self.bucket}")
        return self.s3("GET", url[len(prefix):])

    def run_each_prefab(self, gateway):
        _, stub = self.gateway(gateway)
        text = b"".join(b"line %d of the container check\n" % i for i in range(20000))
        self.s3("PUT", "inputs/text.txt", text)
        files = self.outputs(list(self.call(stub, {
            "prefabId": "hello-world-prefab", "version": "1.0.0", "functionName": "uppercase",
            "inputs": {"text": f"s3://{self.bucket}/inputs/text.txt"}})))
        if self.fetch(files["output"]) != text.upper():
            raise CheckFailed("hello-world-prefab uppercase: the output is not the input upper-cased")
        self.ok(f"hello-world-prefab uppercase through {gateway.name}: {len(text)} bytes, output byte-identical")

        blob = os.urandom(3 << 20) + text
        self.s3("PUT", "inputs/blob.bin", blob)
        files = self.outputs(list(self.call(stub, {
            "prefabId": "gzip", "version": "1.0.0", "functionName": "compress",
            "inputs": {"file": f"s3://{self.bucket}/inputs/blob.bin", "level": 6}})))
        if gzip.decompress(self.fetch(files["output"])) != blob:
            raise CheckFailed("gzip compress: the output does not decompress to the input")
        self.ok(f"gzip compress through {gateway.name}: {len(blob)} bytes, output decompresses to the input")
        # decompress reads its streaming input through a named pipe in the
        # container's /tmp (an emptyDir under a read-only root).
        files = self.outputs(list(self.call(stub, {
            "prefabId": "gzip", "version": "1.0.0", "functionName": "decompress",
            "inputs": {"file": files["output"]}})))
        if self.fetch(files["output"]) != blob:
            raise CheckFailed("gzip decompress: the output is not the original input")
        self.ok(f"gzip decompress through {gateway.name}: the output is the original {len(blob)} bytes")

    def sigterm_mid_run(self, gateway):
        """SIGTERM to a replica while it runs: the run still completes, within the grace period."""
        _, stub = self.gateway(gateway)
        events = self.call(stub, {"prefabId": "hello-world-prefab", "version": "1.0.0",
                                 "functionName": "sleep", "inputs": {"seconds": 4}})
        first = next(events)
        if first.WhichOneof("event") != "accepted":
            raise CheckFailed(f"the sleep run began with {first.WhichOneof('event')}")
        time.sleep(1)
        started = time.monotonic()
        stopper = threading.Thread(target=self.kubelet.stop, args=(gateway,))
        stopper.start()
        rest = list(events)
        stopper.join()
        took = time.monotonic() - started
        self.outputs([first, *rest])
        name = gateway.container_name(gateway.spec["containers"][0])
        state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name)
        if state != "exited 0" or took >= gateway.grace():
            raise CheckFailed(f"{name} after SIGTERM: {state} in {took:.1f} s (grace {gateway.grace()} s)"
                              f"\n{self.kubelet.logs(name)}")
        self.ok(f"SIGTERM to {name} mid-run: the run completed, the gateway exited 0 in {took:.1f} s "
                f"(grace {gateway.grace()} s)")

    def volume_is_empty(self):
        left = []
        for path in self.opts.volume.rglob("*"):
            rel = path.relative_to(self.opts.volume)
            # Ended runs' records stay for Watch (PREFAB_RUN_RETENTION_SECONDS).
            if rel.parts[0] == ".runs" and (len(rel.parts) == 1 or rel.parts[1] != ".live"):
                continue
            if rel.parts == (".runs", ".live"):
                continue
            left.append(str(rel))
        if left:
            raise CheckFailed(f"left in the volume after the runs: {sorted(left)[:10]}")
        self.ok("nothing left in the volume but the ended runs' records")

    def run(self):
        """The check's steps, in order."""
        check, kubelet = self, self.kubelet
        pods = pods_of(kubelet.resources)
        prefabs = [p for p in pods if p.kind == "Knative"]
        gateways = [p for p in pods if p.kind == "Deployment"]
        if not prefabs or len(gateways) < 2:
            raise CheckFailed(f"expected prefabs and two gateway replicas or more, got {[p.name for p in pods]}")
        for pod in prefabs + gateways:
            kubelet.start(pod)
        for pod in prefabs + gateways:
            check.wait_ready(pod)
        check.run_each_prefab(gateways[0])
        check.sigterm_mid_run(gateways[1])
        for pod in pods:
            if pod is not gateways[1]:
                kubelet.stop(pod)
        check.volume_is_empty()

if __name__ == "__main__":
    sys.exit(main())
