"""The chart's mutual TLS (issue 25, item 4): on by default, a certificate per service naming it,
policy and the rewriter told who may call them; off only when the values say `insecure`. The
chart's own certificates are then used by a real policy service and refused for the wrong
service."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from pathlib import Path

import grpc
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from submitd.v1 import policy_pb2, policy_pb2_grpc
from submitd_devkit.testing.waiting import eventually
from test_chart import CHART, KUBERNETES, by_kind, load, render

SERVICES = ("frontend", "policy", "rewriter", "relay")
ALLOWED = {"policy": ["mail-submitd-frontend"],
           "rewriter": ["mail-submitd-frontend:SubmitMany", "mail-submitd-frontend:Submit", "mail-submitd-relay:Rewrite"]}


def container(docs: list[dict], service: str) -> dict:
    (c,) = by_kind(docs, "Deployment")[f"mail-submitd-{service}"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict], service: str) -> dict[str, str]:
    return {e["name"].removeprefix(f"SUBMITD_{service.upper()}_"): e.get("value") for e in container(docs, service)["env"]}


def secret_volumes(docs: list[dict], service: str) -> set[str]:
    volumes = by_kind(docs, "Deployment")[f"mail-submitd-{service}"]["spec"]["template"]["spec"]["volumes"]
    return {v["secret"]["secretName"] for v in volumes if "secret" in v}


def pem(secret: dict, key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


def test_mtls_is_on_by_default_with_a_certificate_per_service_naming_it():
    docs = render()
    secrets = by_kind(docs, "Secret")
    ca = x509.load_pem_x509_certificate(pem(secrets["mail-submitd-grpc-ca"], "tls.crt"))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for service in SERVICES:
        name = f"mail-submitd-{service}"
        secret = secrets[f"{name}-grpc-tls"]
        assert secret["type"] == "kubernetes.io/tls"
        cert = x509.load_pem_x509_certificate(pem(secret, "tls.crt"))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [name, f"{name}.mail.svc"]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        cert.verify_directly_issued_by(ca)
        assert pem(secret, "ca.crt") == pem(secrets["mail-submitd-grpc-ca"], "tls.crt")

        # Each pod holds its own key and no other service's; none holds the CA's key.
        grpc_secrets = {s for s in secret_volumes(docs, service) if "grpc" in s}
        assert grpc_secrets == {f"{name}-grpc-tls"}, service
        env = env_of(docs, service)
        assert env["GRPC_TLS_CERT"] == "/etc/submitd/grpc-tls/tls.crt" and env["GRPC_TLS_CA"] == "/etc/submitd/grpc-tls/ca.crt"
        if service in ALLOWED:
            assert json.loads(env["GRPC_ALLOWED_CALLERS"]) == ALLOWED[service]
        else:
            assert "GRPC_ALLOWED_CALLERS" not in env, "it serves no gRPC"


def test_without_mtls_the_chart_refuses_to_render_unless_told_it_is_insecure():
    with pytest.raises(helm.HelmError, match="grpcTls.insecure=true"):
        render({"grpcTls": {"enabled": False}})
    docs = render({"grpcTls": {"enabled": False, "insecure": True}})
    assert not [name for name in by_kind(docs, "Secret") if "grpc" in name]
    for service in SERVICES:
        assert not [k for k in env_of(docs, service) if k.startswith("GRPC_")], service
    for service in ("policy", "rewriter"):  # the kubelet's plaintext gRPC probe works again
        assert "grpc" in container(docs, service)["readinessProbe"]
        # ...for readiness alone: their gRPC health is NOT_SERVING while NATS is away, and a NATS
        # outage must not restart them.
        for probe in ("startupProbe", "livenessProbe"):
            assert container(docs, service)[probe]["httpGet"]["path"] == "/healthz", (service, probe)
    with helm.Chart.load(str(CHART)) as chart:  # the one shared certificate is gone
        with pytest.raises(helm.HelmError, match="existingSecret"):
            chart.validate_schema({"grpcTls": {"existingSecret": "submitd-grpc-mtls"}})


def test_cert_manager_issues_one_certificate_per_service_and_the_chart_makes_none():
    docs = render(load("cert-manager"))
    certificates = by_kind(docs, "Certificate")
    for service in SERVICES:
        name = f"mail-submitd-{service}"
        spec = certificates[f"{name}-grpc-tls"]["spec"]
        assert spec["commonName"] == name and spec["secretName"] == f"{name}-grpc-tls"
        assert spec["dnsNames"] == [name, f"{name}.mail.svc"]
        assert spec["issuerRef"] == {"name": "submitd-internal-ca", "kind": "Issuer"}
        server, client = service in ALLOWED, service in ("frontend", "relay")
        assert ("server auth" in spec["usages"], "client auth" in spec["usages"]) == (server, client), service
        assert {s for s in secret_volumes(docs, service) if "grpc" in s} == {f"{name}-grpc-tls"}
    assert not [name for name in by_kind(docs, "Secret") if "grpc" in name], "cert-manager makes them"
    assert json.loads(env_of(docs, "rewriter")["GRPC_ALLOWED_CALLERS"]) == ALLOWED["rewriter"]


def test_secrets_of_the_operators_own_one_per_service():
    docs = render(load("ha"))
    assert not [d for d in docs if d["kind"] in ("Certificate", "Secret") and "grpc" in d["metadata"]["name"]]
    for service in SERVICES:
        assert {s for s in secret_volumes(docs, service) if "grpc" in s} == {f"submitd-grpc-{service}"}


def test_callers_follow_the_calls_flags_of_any_service():
    """A fifth service that serves gRPC, called by the relay for one method: its callers come
    from the flags, as everything else the chart does for a service."""
    archiver = {"ports": [{"name": "grpc", "containerPort": 50060}, {"name": "http", "containerPort": 8080}],
                "probe": {"grpc": 50060}, "grpcPort": 50060, "mounts": ["grpcTls"]}
    relay = {"calls": ["rewriter", "archiver"], "callMethods": {"rewriter": ["Rewrite"], "archiver": ["Store", "Fetch"]}}
    docs = render({"services": {"archiver": archiver, "relay": relay}})
    env = {e["name"]: e.get("value") for e in container(docs, "archiver")["env"]}
    assert json.loads(env["SUBMITD_ARCHIVER_GRPC_ALLOWED_CALLERS"]) == ["mail-submitd-relay:Store", "mail-submitd-relay:Fetch"]
    assert "mail-submitd-archiver-grpc-tls" in by_kind(docs, "Secret")
    assert json.loads(env_of(docs, "rewriter")["GRPC_ALLOWED_CALLERS"]) == ALLOWED["rewriter"]
    frontend_only = render({"services": {"relay": {"calls": []}}})
    assert json.loads(env_of(frontend_only, "rewriter")["GRPC_ALLOWED_CALLERS"]) == ALLOWED["rewriter"][:2]
    assert "mail-submitd-relay-grpc-tls" not in by_kind(frontend_only, "Secret"), "no gRPC, no certificate"
    for doc in docs:
        if doc["kind"] in ("Secret", "Deployment"):
            for version in KUBERNETES:
                kubernetes_validate.validate(doc, version, strict=True)


CA_LOOKUP = 'lookup "v1" "Secret" .Release.Namespace (printf "%s-grpc-ca" $n)'
CERT_LOOKUP = 'lookup "v1" "Secret" $.Release.Namespace (printf "%s-%s-grpc-tls" $n $name)'


def upgrade(tmp_path: Path, ca: dict | None, certs: dict[str, dict]) -> list[dict]:
    """The chart rendered as an upgrade would be where the cluster holds these Secrets: its two
    lookups answered with them (helm-python-sdk renders offline, where lookup finds nothing)."""
    def literal(data: dict) -> str:
        return '(dict "data" (dict ' + " ".join(f'"{k}" "{v}"' for k, v in data.items()) + "))"

    chart = tmp_path / "submitd"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "certificates.yaml"
    text = template.read_text()
    assert text.count(CA_LOOKUP) == 1 and text.count(CERT_LOOKUP) == 1
    text = text.replace(CA_LOOKUP, literal(ca) if ca else "dict")
    found = "(dict " + " ".join(f'"{s}" {literal(d)}' for s, d in certs.items()) + ")"
    template.write_text(text.replace(CERT_LOOKUP, f"get {found} $name | default dict"))
    with helm.Chart.load(str(chart)) as c:
        out = c.render({}, name="mail", namespace="mail", is_upgrade=True)
    return [d for path, t in sorted(out.items()) if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def test_an_upgrade_keeps_the_ca_and_the_certificates_it_signed(tmp_path):
    first = by_kind(render(), "Secret")
    ca, policy = first["mail-submitd-grpc-ca"]["data"], first["mail-submitd-policy-grpc-tls"]["data"]
    again = by_kind(upgrade(tmp_path / "kept", ca, {"policy": policy}), "Secret")
    assert again["mail-submitd-grpc-ca"]["data"] == ca
    assert again["mail-submitd-policy-grpc-tls"]["data"] == policy, "kept: the pods need no restart"
    made = again["mail-submitd-relay-grpc-tls"]["data"]  # a certificate that was missing, signed by the kept CA
    x509.load_pem_x509_certificate(base64.b64decode(made["tls.crt"])).verify_directly_issued_by(
        x509.load_pem_x509_certificate(base64.b64decode(ca["tls.crt"])))
    # The CA gone: a new one, and the policy's certificate (signed by the old one) made again.
    renewed = by_kind(upgrade(tmp_path / "renewed", None, {"policy": policy}), "Secret")
    assert renewed["mail-submitd-grpc-ca"]["data"]["tls.crt"] != ca["tls.crt"]
    assert renewed["mail-submitd-policy-grpc-tls"]["data"]["tls.crt"] != policy["tls.crt"]
    assert renewed["mail-submitd-policy-grpc-tls"]["data"]["ca.crt"] == renewed["mail-submitd-grpc-ca"]["data"]["tls.crt"]


def test_the_charts_certificates_work_and_the_wrong_service_is_refused(make_stack, tmp_path):
    """The chart's CA, certificates and GRPC_ALLOWED_CALLERS, as rendered, given to a real policy
    service: the frontend's certificate is answered, the relay's refused."""
    docs = render()
    files = {}
    for service in SERVICES:
        secret = by_kind(docs, "Secret")[f"mail-submitd-{service}-grpc-tls"]
        for key in ("tls.crt", "tls.key", "ca.crt"):
            files[service, key] = tmp_path / f"{service}-{key}"
            files[service, key].write_bytes(pem(secret, key))
    settings = env_of(docs, "policy")
    stack = make_stack(start=False)
    stack.extra_env["policy"] = {**stack.extra_env.get("policy", {}), "GRPC_TLS_CERT": str(files["policy", "tls.crt"]),
                                 "GRPC_TLS_KEY": str(files["policy", "tls.key"]), "GRPC_TLS_CA": str(files["policy", "ca.crt"]),
                                 "GRPC_ALLOWED_CALLERS": settings["GRPC_ALLOWED_CALLERS"]}
    stack.nats.start()
    stack.start_service("policy")
    eventually(lambda: ready(stack.ports.policy_http), 30)

    def ask(service: str) -> list[policy_pb2.Verdict]:
        credentials = grpc.ssl_channel_credentials(files[service, "ca.crt"].read_bytes(), files[service, "tls.key"].read_bytes(),
                                                   files[service, "tls.crt"].read_bytes())
        # The name the frontend dials in the cluster (dns:///mail-submitd-policy), on its certificate.
        options = [("grpc.ssl_target_name_override", "mail-submitd-policy")]
        with grpc.secure_channel(f"127.0.0.1:{stack.ports.policy}", credentials, options=options) as ch:
            request = policy_pb2.SessionRequest(id=1, session_id="s", events=[policy_pb2.SessionEvent(
                connect=policy_pb2.Connect(session_id="s", peer_address="198.51.100.7", peer_port=1, local_port=587))])
            for batch in policy_pb2_grpc.PolicyStub(ch).Sessions(iter([policy_pb2.SessionBatch(requests=[request])]), timeout=10):
                return list(batch.replies[0].verdicts)
        raise AssertionError("no verdict")

    assert [v.accept for v in ask("frontend")] == [True]
    with pytest.raises(grpc.RpcError) as e:
        ask("relay")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False
