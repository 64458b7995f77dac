"""Which TLS each MX host of a destination gets, decided before connecting.

In order (DESIGN.md "Outbound TLS"):
1. the site's TLS_POLICY entry for the domain (``none``, ``may``, ``encrypt`` and ``verify`` settle it);
2. DANE for each host whose MX and address records and TLSA records validate (RFC 7672);
   DANE wins over MTA-STS for that host (RFC 8461 §2);
3. the domain's MTA-STS policy (RFC 8461): ``enforce`` drops the hosts its ``mx`` patterns do not
   name and verifies the others' certificates; ``testing`` verifies and reports but delivers anyway;
4. MX_TLS for the rest (opportunistic by default).
A message with ``TLS-Required: No`` (RFC 8689 §5) skips 2 and 3; one sent with REQUIRETLS keeps
only hosts whose certificate will be verified (DANE, MTA-STS enforce, or a ``verify`` entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import NextHopError
from ..routes import Host, MxResolver, TlsaUnavailable
from . import results as R
from .dane import Tlsa
from .table import TableEntry, lookup, parse_table

NONE, MAY, ENCRYPT, VERIFY, DANE = "none", "may", "encrypt", "verify", "dane"


class TlsPolicyError(NextHopError):
    """A next hop that does not meet the destination's TLS policy: never used in clear."""

    def __init__(self, code: int, text: str, result: R.TlsResult | None = None) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.result = result


@dataclass(frozen=True)
class HostTls:
    level: str  # NONE, MAY, ENCRYPT, VERIFY or DANE
    source: str  # "default", "table", "dane", "mta-sts", "tls-required-no", "smarthost"
    tlsa: tuple[Tlsa, ...] = ()
    ca_file: str | None = None
    names: tuple[str, ...] = ()  # what the certificate must name (VERIFY, DANE-TA)
    enforce: bool = True  # False: MTA-STS testing, a failure is reported and delivery goes on
    report: R.TlsResult | None = field(default=None, compare=False)  # the TLS-RPT policy, result unset

    @property
    def label(self) -> str:
        """What an operator reads in spans, logs and `submitctl queue show`."""
        if self.source == "mta-sts":
            return "MTA-STS enforce" if self.enforce else "MTA-STS testing"
        if self.source == "dane":
            return "DANE" if self.level == DANE else "DANE (no usable TLSA record: encrypt)"
        if self.source == "table":
            return f"TLS_POLICY {self.level}"
        if self.source == "tls-required-no":
            return "TLS-Required: No"
        return {NONE: "no TLS", MAY: "opportunistic TLS", ENCRYPT: "TLS required"}.get(self.level, self.level)

    @property
    def verified(self) -> bool:
        """The certificate will be verified and a failure stops the delivery (what REQUIRETLS needs)."""
        return self.level in (VERIFY, DANE) and self.enforce

    @property
    def pool_key(self) -> tuple:
        return (self.level, self.source, self.enforce, self.tlsa, self.names, self.ca_file)


@dataclass
class Plan:
    hosts: list[tuple[Host, HostTls]]
    failures: list[R.TlsResult] = field(default_factory=list)  # policy problems met while planning


class TlsPlanner:
    def __init__(self, settings, resolver: MxResolver, sts=None) -> None:
        self.s = settings
        self.resolver = resolver
        self.sts = sts  # outbound.mtasts.StsPolicies, or None (MTA_STS off)
        self.table: dict[str, TableEntry] = parse_table(settings.tls_policy)
        self.default = {"none": HostTls(NONE, "default"), "opportunistic": HostTls(MAY, "default"),
                        "required": HostTls(ENCRYPT, "default")}[settings.mx_tls]

    async def plan(self, domain: str, hosts: list[Host], *, require_tls: bool = False,
                   tls_optional: bool = False) -> Plan:
        entry = lookup(self.table, domain)
        if entry is not None and entry.mode in (NONE, MAY, ENCRYPT, VERIFY):
            tls = HostTls(entry.mode, "table", ca_file=entry.ca_file or self.s.mx_ca_file,
                          names=tuple(entry.match))
            plan = Plan([(h, tls if tls.names or entry.mode != VERIFY else _named(tls, h)) for h in hosts])
            return self._required(domain, plan, require_tls)
        if tls_optional and not require_tls:
            # RFC 8689 §5: the sender asked that DANE and MTA-STS be ignored for this message.
            return Plan([(h, HostTls(MAY, "tls-required-no")) for h in hosts])
        plan = Plan([])
        undecided: list[Host] = []
        for host in hosts:
            try:
                tlsa = await self.resolver.tlsa(host)
            except TlsaUnavailable as e:
                plan.failures.append(R.TlsResult(domain, R.TLSA, receiving_mx_hostname=host.name,
                                                 receiving_ip=host.address, result_type=R.DNSSEC_INVALID, detail=str(e)))
                continue  # RFC 7672 §2.2: this host is not used, in clear or otherwise
            if tlsa is None:
                if entry is not None and entry.mode == "dane-only":
                    plan.failures.append(R.TlsResult(domain, R.TLSA, receiving_mx_hostname=host.name,
                                                     receiving_ip=host.address, result_type=R.DANE_REQUIRED,
                                                     detail="TLS_POLICY dane-only: no validated TLSA records"))
                    continue
                undecided.append(host)
                continue
            report = R.TlsResult(domain, R.TLSA, tuple(r.text() for r in tlsa), receiving_mx_hostname=host.name,
                                 receiving_ip=host.address)
            usable = tuple(r for r in tlsa if r.usable)
            level = DANE if usable else ENCRYPT
            plan.hosts.append((host, HostTls(level, "dane", usable, names=(host.name, domain), report=report)))
        if undecided:
            await self._sts_or_default(domain, undecided, plan, consider_sts=entry is None)
        # Keep the MX order: DNS gave the preference.
        order = {h: i for i, h in enumerate(hosts)}
        plan.hosts.sort(key=lambda ht: order[ht[0]])
        if not plan.hosts:
            raise self._nothing_left(domain, plan)
        return self._required(domain, plan, require_tls)

    async def _sts_or_default(self, domain: str, hosts: list[Host], plan: Plan, consider_sts: bool) -> None:
        policy = None
        if consider_sts and self.sts is not None:
            policy, failure = await self.sts.policy(domain)
            if failure is not None and policy is None:  # (a cached policy that still applies: no failure)
                plan.failures.append(R.TlsResult(domain, R.STS, result_type=failure,
                                                 detail="the MTA-STS policy could not be fetched or read"))
        if policy is None or policy.mode == "none":
            for h in hosts:
                report = R.TlsResult(domain, R.NO_POLICY, receiving_mx_hostname=h.name, receiving_ip=h.address)
                plan.hosts.append((h, HostTls(self.default.level, self.default.source, report=report)))
            return
        enforce = policy.mode == "enforce"
        for h in hosts:
            report = R.TlsResult(domain, R.STS, tuple(policy.lines()), tuple(policy.mx),
                                 receiving_mx_hostname=h.name, receiving_ip=h.address)
            if not policy.matches(h.name):
                if enforce:
                    plan.failures.append(_with(report, R.VALIDATION_FAILURE,
                                               f"MX host {h.name} is not named by the policy's mx patterns"))
                    continue
                plan.failures.append(_with(report, R.VALIDATION_FAILURE,
                                           f"MX host {h.name} is not named by the policy (testing: delivered)"))
            plan.hosts.append((h, HostTls(VERIFY, "mta-sts", ca_file=self.s.mx_ca_file, names=(h.name,),
                                          enforce=enforce, report=report)))

    def _nothing_left(self, domain: str, plan: Plan) -> TlsPolicyError:
        kinds = {f.result_type for f in plan.failures}
        if R.DNSSEC_INVALID in kinds:
            return TlsPolicyError(451, f"4.7.5 DANE: the TLSA records of the mail hosts of {domain} could not be "
                                  "validated (DNSSEC-bogus or unreachable)", plan.failures[0])
        if R.DANE_REQUIRED in kinds:
            return TlsPolicyError(451, f"4.7.5 DANE required (TLS_POLICY dane-only) and no mail host of {domain} "
                                  "has validated TLSA records", plan.failures[0])
        patterns = next((f.mx_host_patterns for f in plan.failures if f.mx_host_patterns), ())
        return TlsPolicyError(451, f"4.7.5 MTA-STS enforce: no mail host of {domain} is named by the policy "
                              f"(mx: {', '.join(patterns)})", plan.failures[0] if plan.failures else None)

    def _required(self, domain: str, plan: Plan, require_tls: bool) -> Plan:
        if not require_tls:
            return plan
        verified = [(h, t) for h, t in plan.hosts if t.verified]
        if not verified:
            raise TlsPolicyError(550, f"5.7.10 REQUIRETLS: no mail host of {domain} has a DANE or MTA-STS "
                                 "policy (or a TLS_POLICY verify entry) to verify its certificate")
        return Plan(verified, plan.failures)


def _named(tls: HostTls, host: Host) -> HostTls:
    return HostTls(tls.level, tls.source, tls.tlsa, tls.ca_file, (host.name,), tls.enforce, tls.report)


def _with(report: R.TlsResult, result_type: str, detail: str) -> R.TlsResult:
    return R.TlsResult(report.policy_domain, report.policy_type, report.policy_strings, report.mx_host_patterns,
                       report.receiving_mx_hostname, report.receiving_ip, result_type, detail)
