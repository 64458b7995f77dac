"""DKIM signing (RFC 6376, relaxed/relaxed) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463).

The body hash is computed as chunks stream through, so memory does not grow with the message.
Keys come from a YAML file (a mounted Secret) and are reloaded on change:

    keys:
      - {domain: example.net, selector: s2026r, key_file: /etc/submitd/dkim/s2026r.pem}
      - {domain: example.net, selector: s2026e, key_file: s2026e.pem}   # beside this file

Every key of the From domain signs (RSA and Ed25519 side by side; a new selector for rotation).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from submitd_common.files import load_yaml

# Signed when present; From twice so that a From added later breaks the signature.
SIGNED_HEADERS = [
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "in-reply-to", "references", "list-id", "list-unsubscribe", "list-unsubscribe-post",
]
OVERSIGNED = {"from"}
_WSP = re.compile(rb"[ \t]+")


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    private_key: object

    @property
    def algorithm(self) -> str:
        return "ed25519-sha256" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def load_keys(path: str) -> dict[str, list[Key]]:
    """domain -> keys, from the YAML keys file."""
    out: dict[str, list[Key]] = {}
    for entry in load_yaml(path).get("keys") or []:
        # A relative key_file is beside the keys file (one Secret holds both: submitctl).
        with open(os.path.join(os.path.dirname(path), entry["key_file"]), "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        if not isinstance(private, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise ValueError(f"{entry['key_file']}: only RSA and Ed25519 keys sign DKIM")
        domain = str(entry["domain"]).lower()
        out.setdefault(domain, []).append(Key(domain, str(entry["selector"]), private))
    return out


class BodyHash:
    """Relaxed body canonicalization and SHA-256, fed in chunks of any size."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.partial = b""
        self.empty_lines = 0  # held back: trailing empty lines are not hashed
        self.any = False

    def update(self, data: bytes) -> None:
        data = self.partial + data if self.partial else data
        end = data.rfind(b"\r\n")
        if end < 0:
            self.partial = data
            return
        self.partial = data[end + 2 :]
        block = data[: end + 2]
        # Whole blocks, C-speed (a regex pass over [ \t]+ costs ten times more): tabs become
        # spaces, runs of spaces halve with each pass, then the space left before a line end goes.
        if b"\t" in block:
            block = block.replace(b"\t", b" ")
        while b"  " in block:
            block = block.replace(b"  ", b" ")
        if b" \r\n" in block:
            block = block.replace(b" \r\n", b"\r\n")
        content = block.rstrip(b"\r\n")
        empties, odd = divmod(len(block) - len(content), 2)
        if not odd and block[len(content):] == b"\r\n" * empties:
            if not content:
                self.empty_lines += empties
                return
            if self.empty_lines:
                self.sha.update(b"\r\n" * self.empty_lines)
            self.sha.update(memoryview(block)[: len(content) + 2])
            self.empty_lines = empties - 1  # trailing empty lines are held back
            self.any = True
            return
        self._lines(block)

    def _lines(self, block: bytes) -> None:
        """Line by line: for a block whose end is not plain CRLFs (a bare CR or LF there)."""
        for line in block.split(b"\r\n")[:-1]:
            if not line:
                self.empty_lines += 1
                continue
            if self.empty_lines:
                self.sha.update(b"\r\n" * self.empty_lines)
                self.empty_lines = 0
            self.sha.update(line + b"\r\n")
            self.any = True

    def digest(self) -> bytes:
        if self.partial:  # a last line without CRLF
            self.update(b"\r\n")
        return self.sha.digest()


def relaxed_header(name: bytes, raw_field: bytes) -> bytes:
    value = raw_field.split(b":", 1)[1]
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip().lower() + b":" + value


def sign(fields: list[tuple[bytes, bytes]], body_hash: bytes, key: Key, now: int | None = None) -> bytes:
    """The DKIM-Signature field (with CRLF) over ``fields`` ((name, raw field) pairs in order)."""
    present: dict[str, list[bytes]] = {}
    for name, raw in fields:
        present.setdefault(name.decode("ascii", "replace").strip().lower(), []).append(raw)
    names: list[str] = []
    for h in SIGNED_HEADERS:
        count = len(present.get(h, []))
        names.extend([h] * count)
        if h in OVERSIGNED and count:
            names.append(h)
    taken: dict[str, int] = {}
    canon: list[bytes] = []
    for h in names:
        instances = present.get(h, [])
        used = taken.get(h, 0)
        taken[h] = used + 1
        if used < len(instances):  # bottom-up: the last instance first (RFC 6376 §5.4.2)
            raw = instances[len(instances) - 1 - used]
            canon.append(relaxed_header(h.encode(), raw) + b"\r\n")
        # an oversigned name beyond the instances signs the absence: contributes nothing
    tags = (
        f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector};\r\n"
        f"\tt={now or int(time.time())}; h={':'.join(names)};\r\n"
        f"\tbh={base64.b64encode(body_hash).decode()};\r\n\tb="
    )
    unsigned = b"DKIM-Signature: " + tags.encode()
    data = b"".join(canon) + relaxed_header(b"dkim-signature", unsigned)
    if key.algorithm == "rsa-sha256":
        signature = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.private_key.sign(hashlib.sha256(data).digest())
    b = base64.b64encode(signature).decode()
    folded = "\r\n\t ".join(b[i : i + 72] for i in range(0, len(b), 72))
    return unsigned + folded.encode() + b"\r\n"


def generate_key(algorithm: str) -> object:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def txt_record(key, domain: str, selector: str) -> str:
    """The DNS TXT record that publishes ``key``'s public half."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        k, p = "ed25519", base64.b64encode(raw).decode()
    else:
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        k, p = "rsa", base64.b64encode(der).decode()
    value = f"v=DKIM1; k={k}; p={p}"
    quoted = " ".join(f'"{value[i:i + 250]}"' for i in range(0, len(value), 250))
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def txt_value(key) -> bytes:
    """The record's text as a resolver returns it (for tests' DNS lookups)."""
    record = txt_record(key, "d", "s")
    return "".join(re.findall(r'"([^"]*)"', record)).encode()
