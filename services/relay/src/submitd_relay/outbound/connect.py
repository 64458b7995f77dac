"""A connection to an MX host under the TLS its plan gives it (outbound/plan.py).

Nothing of a message is sent before this returns: a host that strips STARTTLS, presents a
certificate its TLSA records do not match, or one that MTA-STS cannot verify is refused here,
and the message waits for another host or a later try; it never goes in clear where a policy
asked for TLS. Opportunistic TLS (RFC 7435) alone falls back to clear text, as other MTAs do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl

import aiosmtplib
from cryptography import x509

from ..routes import Host
from . import results as R
from .dane import DaneMismatch, cert_names_match, peer_chain, verify
from .plan import DANE, MAY, NONE, VERIFY, HostTls, TlsPolicyError

log = logging.getLogger("submitd.relay")

# OpenSSL's verify codes (X509_V_ERR_*) to RFC 8460 result types.
_EXPIRED = {9, 10}  # not yet valid, expired
_UNTRUSTED = {2, 18, 19, 20, 21, 27}  # no issuer, self-signed, untrusted root


@functools.lru_cache(maxsize=64)
def _context(verified: bool, ca_file: str | None) -> ssl.SSLContext:
    """One context per kind (loading a CA store costs milliseconds: never per connection).
    Names are checked by us, not OpenSSL: a policy may accept more than one (RFC 7672 §3.2.3,
    a TLS_POLICY ``match`` list)."""
    ctx = ssl.create_default_context(cafile=ca_file if verified else None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED if verified else ssl.CERT_NONE
    return ctx


class Connected:
    """An open client and what its TLS came to, for the span, the log and TLS reporting."""

    def __init__(self, client: aiosmtplib.SMTP, tls: HostTls, verified: str, result: R.TlsResult | None) -> None:
        self.client = client
        self.tls = tls
        self.verified = verified  # "DANE-EE 1 1", "certificate verified", "" (none)
        self.result = result  # the TLS-RPT session result (success or, under MTA-STS testing, a failure)


async def open_mx(host: Host, tls: HostTls, settings) -> Connected:
    client = await _plain(host, settings)
    try:
        return await _secure(client, host, tls, settings)
    except _TestingFailure as failure:
        # MTA-STS testing: the failure is reported and the message goes as opportunistic TLS would.
        client.close()
        log.info("MTA-STS testing: %s: delivering anyway", failure.result.detail)
        fallback = await open_mx(host, HostTls(MAY, tls.source, report=tls.report), settings)
        fallback.tls, fallback.result = tls, failure.result
        return fallback
    except BaseException:
        client.close()
        raise


class _TestingFailure(Exception):
    def __init__(self, result: R.TlsResult) -> None:
        self.result = result


async def _plain(host: Host, settings) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=host.address, port=host.port, local_hostname=settings.helo_name,
                             timeout=settings.command_timeout, start_tls=False)
    try:
        await asyncio.wait_for(client.connect(), settings.connect_timeout)
        await _ehlo(client)
    except BaseException:
        client.close()
        raise
    return client


async def _ehlo(client: aiosmtplib.SMTP) -> None:
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()


def _fail(tls: HostTls, host: Host, result_type: str, code: int, text: str) -> Exception:
    result = _result(tls, host, result_type, text)
    if not tls.enforce:
        return _TestingFailure(result)
    return TlsPolicyError(code, f"{text}", result)


def _result(tls: HostTls, host: Host, result_type: str | None, detail: str = "") -> R.TlsResult:
    base = tls.report or R.TlsResult("", R.NO_POLICY)
    return R.TlsResult(base.policy_domain, base.policy_type, base.policy_strings, base.mx_host_patterns,
                       host.name, host.address, result_type, detail)


async def _secure(client: aiosmtplib.SMTP, host: Host, tls: HostTls, settings) -> Connected:
    if tls.level == NONE:
        return Connected(client, tls, "", _result(tls, host, None))
    if not client.supports_extension("starttls"):
        if tls.level == MAY:
            return Connected(client, tls, "", _result(tls, host, R.STARTTLS_NOT_SUPPORTED, "no STARTTLS offered"))
        raise _fail(tls, host, R.STARTTLS_NOT_SUPPORTED, 451,
                    f"4.7.4 {tls.label}: {host.name} does not offer STARTTLS (TLS is required)")
    verified = tls.level == VERIFY
    try:
        await client.starttls(server_hostname=tls.names[0] if tls.names else host.name,
                              tls_context=_context(verified, tls.ca_file if verified else None))
    except ssl.SSLCertVerificationError as e:
        kind = (R.CERTIFICATE_EXPIRED if e.verify_code in _EXPIRED else
                R.CERTIFICATE_NOT_TRUSTED if e.verify_code in _UNTRUSTED else R.VALIDATION_FAILURE)
        raise _fail(tls, host, kind, 451,
                    f"4.7.5 {tls.label}: certificate for {host.name} not verified ({e.verify_message})") from None
    except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPResponseException) as e:
        if tls.level == MAY:
            # Opportunistic TLS (RFC 7435) that fails falls back to a clear connection.
            log.info("STARTTLS with %s:%s failed (%r): delivering without TLS", host.name, host.port, e)
            client.close()
            clear = await _plain(host, settings)
            return Connected(clear, tls, "", _result(tls, host, R.VALIDATION_FAILURE, f"STARTTLS failed: {e}"))
        raise _fail(tls, host, R.VALIDATION_FAILURE, 451,
                    f"4.7.5 {tls.label}: TLS with {host.name} failed ({type(e).__name__})") from None
    ssl_object = client.get_transport_info("ssl_object")
    what = ""
    if tls.level == DANE:
        try:
            what = verify(peer_chain(ssl_object), list(tls.tlsa), list(tls.names))
        except DaneMismatch as e:
            raise _fail(tls, host, R.TLSA_INVALID, 451,
                        f"4.7.5 DANE: certificate of {host.name} does not match its TLSA records ({e})") from None
    elif verified:
        leaf = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
        if not cert_names_match(leaf, list(tls.names)):
            raise _fail(tls, host, R.CERTIFICATE_HOST_MISMATCH, 451,
                        f"4.7.5 {tls.label}: certificate for {host.name} does not match "
                        f"(it names none of {', '.join(tls.names)})")
        what = "certificate verified"
    await _ehlo(client)
    return Connected(client, tls, what, _result(tls, host, None))
