"""What one TLS attempt to a next hop came to, in RFC 8460's terms: the policy that applied and,
for a failure, its result type. The delivery code makes these; TLS reporting counts them."""

from __future__ import annotations

from dataclasses import dataclass

# Policy types (RFC 8460 §4.3 "policy-type").
TLSA = "tlsa"
STS = "sts"
NO_POLICY = "no-policy-found"

# Result types (RFC 8460 §4.3.1-4.3.3).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"


@dataclass(frozen=True)
class TlsResult:
    policy_domain: str  # the recipient domain whose policy applied
    policy_type: str  # TLSA, STS or NO_POLICY
    policy_strings: tuple[str, ...] = ()  # the TLSA records as text, or the MTA-STS policy's lines
    mx_host_patterns: tuple[str, ...] = ()  # MTA-STS: the policy's mx patterns
    receiving_mx_hostname: str = ""
    receiving_ip: str = ""
    result_type: str | None = None  # None: a successful TLS session under the policy
    detail: str = ""  # for "additional-information" and logs

    @property
    def ok(self) -> bool:
        return self.result_type is None
