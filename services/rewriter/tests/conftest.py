"""DKIM keys for the rewriter's tests, as an operator mounts them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import dkim as dkimpy
import pytest
import yaml

from submitd_common.files import WatchedFile
from submitd_rewriter import dkim

SELECTORS = {"rsa": "r2026", "ed25519": "e2026"}


@dataclass
class Signing:
    keys: WatchedFile  # what the rewriter is given
    public: dict[bytes, object]  # DNS name -> key

    @property
    def selectors(self) -> list[str]:
        return sorted(SELECTORS.values())

    def dns(self, name: bytes, timeout: float = 5) -> bytes:
        return dkim.txt_value(self.public[name])

    def verified(self, message: bytes) -> list[str]:
        """The selectors of the signatures in ``message`` that dkimpy verifies (sorted), once
        the message is as the relay sends it: DATA ends a last line without CRLF with one.
        (dkimpy adds that CRLF after it has dropped the spaces at line ends, so it would keep
        the spaces that end such a line; RFC 6376 §3.4.4 and the rewriter drop them.)"""
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        header = message.split(b"\r\n\r\n", 1)[0]
        selectors = re.findall(rb"^DKIM-Signature:.*? s=([\w-]+);", header, flags=re.MULTILINE)
        d = dkimpy.DKIM(message)
        passed = []
        for i, selector in enumerate(selectors):
            try:
                if d.verify(idx=i, dnsfunc=self.dns):
                    passed.append(selector.decode())
            except dkimpy.ValidationError:  # a body hash that does not match, for one
                pass
        return sorted(passed)


@pytest.fixture(scope="session")
def signing(tmp_path_factory) -> Signing:
    """A keys file (an RSA and an Ed25519 key for example.net, each beside it) and the public
    halves a DNS lookup would return."""
    root = tmp_path_factory.mktemp("dkim")
    public, entries = {}, []
    for algorithm, selector in SELECTORS.items():
        key = dkim.generate_key(algorithm)
        (root / f"{selector}.pem").write_bytes(dkim.private_pem(key))
        entries.append({"domain": "example.net", "selector": selector, "key_file": f"{selector}.pem"})
        public[f"{selector}._domainkey.example.net.".encode()] = key
    (root / "dkim.yaml").write_text(yaml.safe_dump({"keys": entries}))
    return Signing(WatchedFile(str(root / "dkim.yaml"), dkim.load_keys), public)
