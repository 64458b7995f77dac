"""The chart behind a PROXY-speaking balancer: one value (frontendService.proxyTrustedNetworks)
makes both the frontend's PROXY_TRUSTED_NETWORKS and the NetworkPolicy of the PROXY ports, and
in-cluster clients get a port of their own that takes no PROXY header."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import pytest

from test_chart import CHART, KUBERNETES, by_kind, render

BALANCERS = ["10.0.64.0/20", "192.0.2.7/32"]
PROXIED = {"frontendService": {"proxyProtocol": True, "proxyTrustedNetworks": BALANCERS}}


def frontend_env(docs: list[dict]) -> dict[str, str]:
    (c,) = by_kind(docs, "Deployment")["mail-submitd-frontend"]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"]}


def frontend_ingress(docs: list[dict]) -> list[dict]:
    """Every ingress rule of every NetworkPolicy that selects the frontend's pods (they add up)."""
    labels = {"app.kubernetes.io/name": "submitd", "app.kubernetes.io/instance": "mail",
              "app.kubernetes.io/component": "frontend"}
    rules = []
    for policy in by_kind(docs, "NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if "matchExpressions" not in policy["spec"]["podSelector"] and selector.items() <= labels.items():
            rules += policy["spec"].get("ingress", [])
    return rules


def rules_for(rules: list[dict], port: int) -> list[dict]:
    return [r for r in rules if any(p["port"] == port for p in r.get("ports", []))]


def test_the_balancers_feed_both_the_frontends_trust_and_the_network_policy_of_the_proxy_ports(monkeypatch):
    docs = render(PROXIED)
    env = frontend_env(docs)
    assert env["SUBMITD_FRONTEND_PROXY_PROTOCOL"] == "true"
    # The value as the frontend reads it: the same networks, and a frontend that starts.
    from submitd_frontend.settings import Settings

    for name, value in env.items():
        if name.startswith("SUBMITD_FRONTEND_PROXY_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.proxy_protocol and settings.proxy_trusted_networks == BALANCERS

    rules = frontend_ingress(docs)
    for port in (1587, 1465):
        opened = rules_for(rules, port)
        assert opened, f"{port} closed to the balancer too"
        for rule in opened:
            assert [peer["ipBlock"]["cidr"] for peer in rule.get("from", [])] == BALANCERS, \
                f"{port} is open to more than the balancers: {rule}"
    for doc in by_kind(docs, "NetworkPolicy").values():
        for version in KUBERNETES:
            kubernetes_validate.validate(doc, version, strict=True)


def test_without_proxy_protocol_587_and_465_are_open_to_anyone_and_trust_no_header():
    docs = render()
    env = frontend_env(docs)
    assert env["SUBMITD_FRONTEND_PROXY_PROTOCOL"] == "false"
    assert env["SUBMITD_FRONTEND_PROXY_TRUSTED_NETWORKS"] == "[]"
    for port in (1587, 1465):
        assert any("from" not in rule for rule in rules_for(frontend_ingress(docs), port)), port


@pytest.mark.parametrize("values", [PROXIED, {}], ids=["proxy", "direct"])
def test_in_cluster_clients_have_a_port_without_proxy_on_the_internal_service_and_only_they(values):
    docs = render(values)
    env = frontend_env(docs)
    assert env["SUBMITD_FRONTEND_INTERNAL_SUBMISSION_LISTEN"] == "0.0.0.0:1588"
    internal = by_kind(docs, "Service")["mail-submitd-frontend-internal"]["spec"]
    assert internal.get("type", "ClusterIP") == "ClusterIP"
    assert {"name": "internal", "port": 1588, "targetPort": "internal", "protocol": "TCP"} in internal["ports"]
    public = by_kind(docs, "Service")["mail-submitd-frontend"]["spec"]
    assert {p["port"] for p in public["ports"]} == {587, 465}, "the internal port is never on the balancer"
    [rule] = rules_for(frontend_ingress(docs), 1588)
    assert rule["from"] == [{"namespaceSelector": {}}], "pods of the cluster, nothing from outside it"


def test_helm_test_reaches_the_frontend_where_it_may():
    def servers(docs: list[dict]) -> str:
        return "\n".join(" ".join(p["spec"]["containers"][0]["command"]) for p in by_kind(docs, "Pod").values())

    submission = {"tests": {"submission": {"user": "you@example.com", "passwordSecret": "check-pw"}}}
    direct = servers(render(submission))
    assert "--server=mail-submitd-frontend:587" in direct and '"mail-submitd-frontend:587"' in direct
    behind = servers(render(PROXIED | submission))
    # Behind a PROXY balancer 587 takes only the balancer: helm test's pods use the internal port.
    assert "--server=mail-submitd-frontend-internal:1588" in behind
    assert '"mail-submitd-frontend-internal:1588"' in behind and "frontend:587" not in behind


def test_proxy_protocol_without_its_balancers_does_not_render():
    with pytest.raises(helm.HelmError, match="proxyTrustedNetworks is required"):
        render({"frontendService": {"proxyProtocol": True}})


@pytest.mark.parametrize("networks", [["10.0.0.1"], ["any"]])
def test_the_schema_takes_only_cidrs_for_the_balancers(networks):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError, match="proxyTrustedNetworks"):
            chart.validate_schema({"frontendService": {"proxyProtocol": True, "proxyTrustedNetworks": networks}})


def test_cluster_clients_can_be_narrowed_to_a_namespace():
    webmail = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "webmail"}}}]
    docs = render({"networkPolicy": {"clusterClients": webmail}})
    [rule] = rules_for(frontend_ingress(docs), 1588)
    assert rule["from"] == webmail
