"""A test double of the Kubernetes API server, for submitctl's adapter: no API server can run on
these machines. It serves only the paths submitctl uses, and serves them as the API does:

- the objects are the chart's own, rendered by Helm for a release, with what the API server adds
  (resourceVersion, uid, status; a Secret's stringData folded into data), and every object served
  or received is checked against the Kubernetes OpenAPI schema (kubernetes-validate, strict);
- Secrets: GET, PUT with optimistic concurrency (a stale metadata.resourceVersion is answered
  409 Conflict with a Status object), POST (409 AlreadyExists);
- lists with labelSelector (equality terms) and events with fieldSelector;
- the pod proxy (``pods/NAME:PORT/proxy/PATH``) forwards to a real process on loopback and, as the
  API server does, drops the caller's Authorization header before forwarding;
- a bearer token is required (401 otherwise);
- a "kubelet": a Secret written is copied, after a delay, into the files the real services of a
  dev-kit Stack read, as a Secret volume reaches a pod.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

from submitd_devkit.ports import free_port

KUBERNETES_VERSION = "1.30"
TOKEN = "operator-token"


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


class KubeApiDouble:
    def __init__(self, objects: list[dict], namespace: str, pod_ports: dict[str, int],
                 mounts: dict[str, Path] | None = None, kubelet_delay: float = 1.0) -> None:
        """``pod_ports``: component -> the loopback port its pod's HTTP port (8080) is forwarded to.
        ``mounts``: Secret name -> directory its files are written to (the kubelet's part)."""
        self.namespace = namespace
        self.pod_ports = pod_ports
        self.mounts = mounts or {}
        self.kubelet_delay = kubelet_delay
        self.lock = threading.Lock()
        self.kubelet_lock = threading.Lock()  # one mount written at a time
        self.mounted: dict[str, int] = {}  # Secret name -> the resourceVersion its mount holds
        self.version = 1000
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, dict]] = []  # method, path, headers
        self.conflicts = 0
        self.after_secret_get = None  # hook(name): a concurrent writer, run between a Secret GET's read and its answer
        for obj in objects:
            if obj["kind"] in ("Secret", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"):
                self._store(copy.deepcopy(obj))
        for deployment in [o for (k, _), o in self.objects.items() if k == "Deployment"]:
            self._store(self._pod_of(deployment))
        for hpa in [o for (k, _), o in self.objects.items() if k == "HorizontalPodAutoscaler"]:
            self._store(self._rescale_event(hpa))
        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- objects as the API server keeps them -------------------------------------------------

    def _store(self, obj: dict) -> dict:
        self.version += 1
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = self.namespace
        meta["resourceVersion"] = str(self.version)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-12-01T10:00:00Z")
        if obj["kind"] == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        if obj["kind"] == "Deployment":
            replicas = obj["spec"].get("replicas", 1)
            obj["status"] = {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                             "updatedReplicas": replicas, "observedGeneration": 1}
        if obj["kind"] == "HorizontalPodAutoscaler":
            obj["status"] = {"currentReplicas": 2, "desiredReplicas": 3, "currentMetrics": [
                {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 91}}}]}
        if obj["kind"] == "PodDisruptionBudget":
            obj["status"] = {"disruptionsAllowed": 1, "currentHealthy": 2, "desiredHealthy": 1, "expectedPods": 2}
        validate(obj)
        self.objects[(obj["kind"], meta["name"])] = obj
        return obj

    def _pod_of(self, deployment: dict) -> dict:
        template = deployment["spec"]["template"]
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{deployment['metadata']['name']}-5d9c7b6f4-x2x7q",
                         "labels": dict(template["metadata"]["labels"])},
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }

    def _rescale_event(self, hpa: dict) -> dict:
        name = hpa["metadata"]["name"]
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.1800f2c3d4e5"},
            "involvedObject": {"kind": "HorizontalPodAutoscaler", "name": name, "namespace": self.namespace,
                               "apiVersion": "autoscaling/v2"},
            "reason": "SuccessfulRescale", "type": "Normal",
            "message": "New size: 3; reason: cpu resource utilization (percentage of request) above target",
            "lastTimestamp": "2026-12-03T07:40:00Z", "firstTimestamp": "2026-12-03T07:40:00Z", "count": 1,
            "source": {"component": "horizontal-pod-autoscaler"},
        }

    def secret_files(self, name: str) -> dict[str, bytes]:
        return self._secret(name)[1]

    def _secret(self, name: str) -> tuple[int, dict[str, bytes]]:
        """A Secret's resourceVersion and files, read together."""
        with self.lock:
            secret = self.objects[("Secret", name)]
            return (int(secret["metadata"]["resourceVersion"]),
                    {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()})

    def put_secret_files(self, name: str, files: dict[str, bytes]) -> None:
        """A change made by someone else (kubectl edit): a new resourceVersion."""
        with self.lock:
            secret = copy.deepcopy(self.objects[("Secret", name)])
            secret["data"] = {k: base64.b64encode(v).decode() for k, v in files.items()}
            self._store(secret)
        self._kubelet(name)

    def _kubelet(self, name: str) -> None:
        """The Secret as it is now reaches its mount ``kubelet_delay`` seconds later. Syncs run
        one at a time, and one that wakes after a later version's (a thread descheduled
        under load) leaves the later version there: a mount never goes back."""
        directory = self.mounts.get(name)
        if directory is None:
            return
        version, files = self._secret(name)
        delay = self.kubelet_delay

        def sync():
            time.sleep(delay)
            self._write_mount(name, directory, version, files)

        threading.Thread(target=sync, daemon=True).start()

    def _write_mount(self, name: str, directory: Path, version: int, files: dict[str, bytes]) -> None:
        with self.kubelet_lock:
            if self.mounted.get(name, 0) > version:
                return
            self.mounted[name] = version
            self._write_files(directory, files)

    @staticmethod
    def _write_files(directory: Path, files: dict[str, bytes]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # keys.yaml / users.yaml last, so that a reader never sees it name a missing file
        for key in sorted(files, key=lambda k: k.endswith(".yaml")):
            tmp = directory / f".{key}.tmp"
            tmp.write_bytes(files[key])
            os.replace(tmp, directory / key)
        for stale in {p.name for p in directory.iterdir() if not p.name.startswith(".")} - set(files):
            (directory / stale).unlink()

    def sync_all(self) -> None:
        """Every mounted Secret written out now, before this returns (the pods' start: a
        service started next reads its files at once, and fails without them)."""
        for name, directory in self.mounts.items():
            self._write_mount(name, directory, *self._secret(name))

    # -- HTTP ---------------------------------------------------------------------------------

    def start(self) -> "KubeApiDouble":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "operator", "user": {"token": TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "operator",
                                                         "namespace": self.namespace}}],
        }))
        return path

    def _handler(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | bytes, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": message, "reason": reason, "code": code})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                self._route("GET")

            def do_PUT(self):
                self._route("PUT")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                double.requests.append((method, url.path, dict(self.headers)))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._status(401, "Unauthorized", "Unauthorized")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                ns = re.escape(double.namespace)
                m = re.fullmatch(rf"/api/v1/namespaces/{ns}/pods/([^/:]+):(\d+)/proxy(/.*)?", url.path)
                if m:
                    return self._proxy(method, m.group(1), url.path[m.end(2) + len("/proxy"):] or "/", url.query)
                routes = [
                    (rf"/api/v1/namespaces/{ns}/secrets/([^/]+)", "Secret"),
                    (rf"/api/v1/namespaces/{ns}/secrets", "Secret*"),
                    (rf"/api/v1/namespaces/{ns}/services/([^/]+)", "Service"),
                    (rf"/api/v1/namespaces/{ns}/pods", "Pod*"),
                    (rf"/api/v1/namespaces/{ns}/events", "Event*"),
                    (rf"/apis/apps/v1/namespaces/{ns}/deployments/([^/]+)", "Deployment"),
                    (rf"/apis/apps/v1/namespaces/{ns}/deployments", "Deployment*"),
                    (rf"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers", "HorizontalPodAutoscaler*"),
                    (rf"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets", "PodDisruptionBudget*"),
                ]
                for pattern, kind in routes:
                    m = re.fullmatch(pattern, url.path)
                    if m:
                        break
                else:
                    return self._status(404, "NotFound", f"the double does not serve {url.path}")
                if kind.endswith("*"):
                    if method == "POST" and kind == "Secret*":
                        return self._create(self._body())
                    if method != "GET":
                        return self._status(405, "MethodNotAllowed", method)
                    return self._list(kind[:-1], query)
                name = m.group(1)
                if method == "PUT" and kind == "Secret":
                    return self._replace(name, self._body())
                if method != "GET":
                    return self._status(405, "MethodNotAllowed", method)
                with double.lock:
                    obj = copy.deepcopy(double.objects.get((kind, name)))
                if obj is None:
                    return self._status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
                if kind == "Secret" and double.after_secret_get:
                    # The concurrent writer goes between this read and the caller's write
                    # whatever the scheduler does: before the answer is sent (after it, the
                    # caller's PUT could come first).
                    double.after_secret_get(name)
                self._send(200, obj)

            def _list(self, kind: str, query: dict) -> None:
                terms = [t.split("=", 1) for t in query.get("labelSelector", "").split(",") if t]
                fields = [t.split("=", 1) for t in query.get("fieldSelector", "").split(",") if t]
                with double.lock:
                    items = [copy.deepcopy(o) for (k, _), o in double.objects.items() if k == kind]
                items = [o for o in items if all(o["metadata"].get("labels", {}).get(k) == v for k, v in terms)]
                items = [o for o in items if all(_field(o, k) == v for k, v in fields)]
                version = "v1" if kind in ("Pod", "Event") else {"Deployment": "apps/v1", "HorizontalPodAutoscaler":
                                                                  "autoscaling/v2", "PodDisruptionBudget": "policy/v1"}[kind]
                self._send(200, {"apiVersion": version, "kind": f"{kind}List",
                                 "metadata": {"resourceVersion": str(double.version)}, "items": items})

            def _replace(self, name: str, raw: bytes) -> None:
                obj = json.loads(raw)
                validate(obj)
                with double.lock:
                    current = double.objects.get(("Secret", name))
                    if current is None:
                        return self._status(404, "NotFound", f'secrets "{name}" not found')
                    if obj["metadata"].get("name") != name:
                        return self._status(400, "BadRequest", "the name in the body does not match the URL")
                    if obj["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                        double.conflicts += 1
                        return self._status(409, "Conflict", f'Operation cannot be fulfilled on secrets "{name}": '
                                            "the object has been modified; please apply your changes to the "
                                            "latest version and try again")
                    stored = double._store(obj)
                    out = copy.deepcopy(stored)
                self._send(200, out)
                double._kubelet(name)

            def _create(self, raw: bytes) -> None:
                obj = json.loads(raw)
                validate(obj)
                name = obj["metadata"]["name"]
                with double.lock:
                    if ("Secret", name) in double.objects:
                        return self._status(409, "AlreadyExists", f'secrets "{name}" already exists')
                    out = copy.deepcopy(double._store(obj))
                self._send(201, out)
                double._kubelet(name)

            def _proxy(self, method: str, pod: str, path: str, query: str) -> None:
                with double.lock:
                    obj = double.objects.get(("Pod", pod))
                if obj is None:
                    return self._status(404, "NotFound", f'pods "{pod}" not found')
                component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
                port = double.pod_ports.get(component)
                if port is None:
                    return self._status(503, "ServiceUnavailable", "error trying to reach service: connection refused")
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("authorization", "host", "content-length", "connection")}
                body = self._body() if method in ("POST", "PUT") else None
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    conn.request(method, path + (f"?{query}" if query else ""), body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except OSError as e:
                    return self._status(503, "ServiceUnavailable", f"error trying to reach service: {e}")
                finally:
                    conn.close()
                self._send(response.status, data, response.getheader("Content-Type", "text/plain"))

        return Handler


def _field(obj: dict, dotted: str) -> str | None:
    value = obj
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
