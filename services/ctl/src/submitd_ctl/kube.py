"""The cluster: a release of the chart reached through the Kubernetes API with the ``kubernetes``
package (kubeconfig and its contexts, exec plugins, or the in-cluster service account).

This adapter is deliberately thin: a handful of REST paths, JSON in and out. What to change is
decided in ``documents`` (pure); which Secret holds what is read from the release's own
Deployments, so Secrets given by ``existingSecret`` values are found like the chart's.

The services' HTTP ports (``/metrics``, the queue admin API) are reached through the API
server's pod proxy. The API server authenticates the operator with the ``Authorization`` header
and removes it before forwarding, so the admin token travels in ``X-Submitd-Admin-Token``. The
chart's NetworkPolicy lets the API server in when ``networkPolicy.apiServerCIDRs`` is set."""

from __future__ import annotations

import base64
import json
import urllib.parse
from pathlib import Path

from .documents import Files
from .site import Conflict, SiteError, parse_loaded

NAME_LABEL = "app.kubernetes.io/name=submitd"
SERVICES = ("frontend", "policy", "rewriter", "relay")
# The Deployment whose volume names each file set (volume names as the chart's mount table).
FILESETS = {"users": ("policy", "users"), "dkim": ("rewriter", "dkim"), "admin": ("relay", "admin-token")}
HTTP_PORT = "8080"
TOKEN_HEADER = "X-Submitd-Admin-Token"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def fullname(release: str, chart: str = "submitd") -> str:
    """The chart's ``submitd.fullname``."""
    name = release if chart in release else f"{release}-{chart}"
    return name[:40].rstrip("-")


def secret_files(secret: dict) -> Files:
    out = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return out


def secret_with_files(secret: dict, files: Files) -> dict:
    """The Secret to PUT: the one read (its resourceVersion is the precondition), new data."""
    out = json.loads(json.dumps(secret))
    out.pop("stringData", None)
    out["data"] = {k: base64.b64encode(v).decode() for k, v in sorted(files.items())}
    return out


def volume_secret(deployment: dict, volume: str) -> str | None:
    for v in deployment.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []:
        if v.get("name") == volume and "secret" in v:
            return v["secret"].get("secretName")
    return None


def ready(pod: dict) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


class KubeSite:
    lag_hint = " (a mounted Secret reaches pods within about a minute; the write is done)"
    unreachable_hint = "; the pod proxy needs networkPolicy.apiServerCIDRs"

    def __init__(self, release: str, namespace: str | None = None, context: str | None = None,
                 kubeconfig: str | None = None) -> None:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if context:
                    active = next(c for c in config.list_kube_config_contexts(config_file=kubeconfig)[0]
                                  if c["name"] == context)
                namespace = active.get("context", {}).get("namespace")
        except (ConfigException, FileNotFoundError, TypeError):
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException as e:
                raise SiteError(f"no Kubernetes configuration: no kubeconfig and not in a cluster ({e})") from e
            if namespace is None and SA_NAMESPACE.exists():
                namespace = SA_NAMESPACE.read_text().strip()
        self.api = client.ApiClient(configuration)
        self.namespace = namespace or "default"
        self.release = release
        self.fullname = fullname(release)
        self._versions: dict[str, dict] = {}

    # -- REST -------------------------------------------------------------------------------

    def request(self, method: str, path: str, query: dict | None = None, body=None,
                headers: dict | None = None) -> tuple[int, bytes]:
        from kubernetes.client.exceptions import ApiException

        if query:
            path += "?" + urllib.parse.urlencode(query)
        headers = dict(headers or {})
        if body is not None:
            # (a dict is serialized by the client; raw bytes go as they are)
            headers.setdefault("Content-Type", "application/json" if isinstance(body, dict) else "application/octet-stream")
        params = self.api.param_serialize(method, path, header_params=headers, body=body,
                                          auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(*params, _request_timeout=(10, 60))
            response.read()
            return response.status, response.data
        except ApiException as e:
            return e.status, (e.body or b"") if isinstance(e.body, bytes) else (e.body or "").encode()
        except Exception as e:  # urllib3's connection errors: the API server is not reachable
            raise SiteError(f"the Kubernetes API is not reachable: {e}") from e

    def get(self, path: str, query: dict | None = None) -> dict:
        status, data = self.request("GET", path, query)
        if status != 200:
            raise SiteError(f"GET {path}: {status} {_message(data)}")
        return json.loads(data)

    def ns(self, path: str, group: str = "api/v1") -> str:
        return f"/{group}/namespaces/{self.namespace}/{path}"

    def selector(self, component: str | None = None) -> str:
        s = f"{NAME_LABEL},app.kubernetes.io/instance={self.release}"
        return s + (f",app.kubernetes.io/component={component}" if component else "")

    # -- files ------------------------------------------------------------------------------

    def secret_name(self, what: str) -> str:
        service, volume = FILESETS[what]
        deployment = self.get(self.ns(f"deployments/{self.fullname}-{service}", "apis/apps/v1"))
        name = volume_secret(deployment, volume)
        if not name:
            raise SiteError(f"the {service} Deployment mounts no Secret as {volume!r}")
        return name

    def read(self, what: str) -> tuple[Files, str]:
        name = self.secret_name(what)
        status, data = self.request("GET", self.ns(f"secrets/{name}"))
        if status == 404:
            secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                      "metadata": {"name": name, "namespace": self.namespace}}
        elif status != 200:
            raise SiteError(f"Secret {name}: {status} {_message(data)}")
        else:
            secret = json.loads(data)
        self._versions[what] = secret
        return secret_files(secret), secret["metadata"].get("resourceVersion", "")

    def write(self, what: str, files: Files, version: str) -> None:
        secret = self._versions[what]
        assert secret["metadata"].get("resourceVersion", "") == version
        body = secret_with_files(secret, files)
        name = body["metadata"]["name"]
        if version:
            status, data = self.request("PUT", self.ns(f"secrets/{name}"), body=body)
        else:
            status, data = self.request("POST", self.ns("secrets"), body=body)
        if status == 409:
            raise Conflict(f"Secret {name} changed while this command ran")
        if status not in (200, 201):
            raise SiteError(f"Secret {name}: {status} {_message(data)}")

    # -- pods -------------------------------------------------------------------------------

    def pods(self, service: str) -> list[dict]:
        return self.get(self.ns("pods"), {"labelSelector": self.selector(service)}).get("items") or []

    def pod_http(self, pod: str, method: str, path: str, headers: dict | None = None,
                 body: bytes | None = None) -> tuple[int, bytes]:
        return self.request(method, self.ns(f"pods/{pod}:{HTTP_PORT}/proxy{path}"), headers=headers, body=body)

    def loaded(self, service: str, file: str) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for pod in self.pods(service):
            name = pod["metadata"]["name"]
            if not ready(pod):
                continue  # not serving: it reads the Secret as it starts
            try:
                status, data = self.pod_http(name, "GET", "/metrics")
            except SiteError:
                status, data = 0, b""
            out[name] = parse_loaded(data.decode()).get(file) if status == 200 else None
        return out

    def admin_token(self) -> str:
        name = self.secret_name("admin")
        files = secret_files(self.get(self.ns(f"secrets/{name}")))
        if "token" not in files:
            raise SiteError(f"Secret {name} has no key 'token'")
        return files["token"].decode().strip()

    def admin(self, method: str, path: str, body: bytes | None = None, service: str = "relay") -> tuple[int, bytes]:
        pods = [p for p in self.pods(service) if ready(p)]
        if not pods:
            raise SiteError(f"no {service} pod is ready")
        headers = {TOKEN_HEADER: self.admin_token()}
        return self.pod_http(pods[0]["metadata"]["name"], method, path, headers=headers, body=body)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        selector = {"labelSelector": self.selector()}
        deployments = self.get(self.ns("deployments", "apis/apps/v1"), selector).get("items") or []
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in
                self.get(self.ns("horizontalpodautoscalers", "apis/autoscaling/v2"), selector).get("items") or []}
        pdbs = {p["metadata"]["name"]: p for p in
                self.get(self.ns("poddisruptionbudgets", "apis/policy/v1"), selector).get("items") or []}
        services = []
        for d in sorted(deployments, key=lambda d: d["metadata"]["name"]):
            name = d["metadata"]["name"]
            component = d["metadata"].get("labels", {}).get("app.kubernetes.io/component", name)
            st = d.get("status", {})
            row = {"name": component, "kind": "Deployment", "ready": st.get("readyReplicas", 0),
                   "desired": d.get("spec", {}).get("replicas", st.get("replicas", 0)),
                   "autoscaler": None, "disruptions_allowed": None}
            if name in hpas:
                row["autoscaler"] = self._hpa(hpas[name])
            if name in pdbs:
                row["disruptions_allowed"] = pdbs[name].get("status", {}).get("disruptionsAllowed")
            services.append(row)
        return {"where": f"{self.namespace}/{self.release}", "services": services}

    def _hpa(self, hpa: dict) -> dict:
        spec, st = hpa.get("spec", {}), hpa.get("status", {})
        metrics = []
        for target, current in zip(spec.get("metrics") or [], (st.get("currentMetrics") or []) + [None] * 8):
            metrics.append(_metric_text(target, current))
        events = self.get(self.ns("events"), {
            "fieldSelector": f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={hpa['metadata']['name']}",
        }).get("items") or []
        rescales = sorted((e for e in events if e.get("reason") == "SuccessfulRescale"),
                          key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        last = rescales[-1] if rescales else None
        return {
            "current": st.get("currentReplicas"), "desired": st.get("desiredReplicas"),
            "min": spec.get("minReplicas", 1), "max": spec.get("maxReplicas"), "metrics": metrics,
            "last_scaling": {"at": last.get("lastTimestamp") or last.get("eventTime"), "message": last.get("message")}
            if last else None,
        }


def _metric_text(target: dict, current: dict | None) -> str:
    """``cpu 45%/70%`` or ``submitd_smtp_sessions_active 12/200``."""
    kind = target.get("type", "")
    spec = target.get(_lower_first(kind), {})
    name = spec.get("name") or spec.get("metric", {}).get("name", "?")
    want = spec.get("target", {})
    have = (current or {}).get(_lower_first(kind), {}).get("current", {})
    if "averageUtilization" in want:
        return f"{name} {have.get('averageUtilization', '?')}%/{want['averageUtilization']}%"
    value = want.get("averageValue") or want.get("value")
    return f"{name} {have.get('averageValue') or have.get('value') or '?'}/{value}"


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _message(data: bytes) -> str:
    try:
        return json.loads(data).get("message", "")
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")
