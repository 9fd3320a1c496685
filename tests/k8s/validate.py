"""Offline validation of Kubernetes YAML against the official schemas.

Core resources are checked strictly (unknown fields rejected) with
kubernetes-validate's bundled OpenAPI schemas. Knative Services are checked
with the Knative Serving models (cloudcoil), and their pod template strictly
against the core PodTemplate schema after taking out the fields Knative adds.
Reads YAML files (or - for standard input); prints "N passed, N failed".
"""

import sys
import copy

import yaml
import kubernetes_validate
from cloudcoil.models.knative_serving.serving import v1 as knative

K8S_VERSION = "1.32.0"
KNATIVE_POD_FIELDS = {
    "timeoutSeconds": int,
    "containerConcurrency": int,
    "responseStartTimeoutSeconds": int,
    "idleTimeoutSeconds": int,
}


def check_knative_service(doc):
    knative.Service.model_validate(doc)
    template = copy.deepcopy(doc["spec"]["template"])
    spec = template.setdefault("spec", {})
    for field, kind in KNATIVE_POD_FIELDS.items():
        if field in spec and not isinstance(spec.pop(field), kind):
            raise ValueError(f"spec.template.spec.{field} must be {kind.__name__}")
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise ValueError("a Knative Service here has exactly one container")
    ports = containers[0].get("ports") or []
    if [p.get("name") for p in ports] not in ([], ["h2c"]):
        raise ValueError("the container port must be named h2c for gRPC")
    pod = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": doc["metadata"]["name"]},
        "template": template,
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def check(doc):
    if doc.get("apiVersion") == "serving.knative.dev/v1" and doc.get("kind") == "Service":
        check_knative_service(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def main(paths):
    passed = failed = 0
    for path in paths:
        text = sys.stdin.read() if path == "-" else open(path).read()
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                check(doc)
                passed += 1
                print(f"ok   {name}")
            except Exception as e:  # noqa: BLE001 - report every kind of failure
                failed += 1
                print(f"FAIL {name}: {str(e).splitlines()[0]}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
