"""``--local DIR``: the same commands on a ``make run`` directory (or any stack the dev kit
started): its files, and its services on loopback, named by ``DIR/run.json``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from submitd_common.files import digest

from . import documents
from .documents import Files
from .site import Conflict, SiteError, parse_loaded

SERVICES = ("frontend", "policy", "rewriter", "relay")


class LocalSite:
    lag_hint = " (each checks the file every RELOAD_INTERVAL; see its log)"
    unreachable_hint = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        descriptor = self.root / "run.json"
        if not descriptor.exists():
            raise SiteError(f"{descriptor} not found: is {self.root} the directory of `make run` (./var)?")
        self.run = json.loads(descriptor.read_text())
        self.users_file = Path(self.run["users_file"])
        self.dkim_dir = Path(self.run.get("dkim_dir") or self.root / "dkim")
        self.ports: dict[str, int] = self.run["ports"]

    # -- files -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self):
        with open(self.root / ".submitctl.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _read(self, what: str) -> Files:
        if what == "users":
            return {documents.USERS: self.users_file.read_bytes()} if self.users_file.exists() else {}
        if not self.dkim_dir.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in self.dkim_dir.iterdir()
                if p.is_file() and (p.name == documents.KEYS or p.suffix == ".pem")}

    def read(self, what: str) -> tuple[Files, str]:
        files = self._read(what)
        return files, version_of(files)

    def write(self, what: str, files: Files, version: str) -> None:
        """Write if nobody changed the files since ``version`` was read (else Conflict)."""
        with self._lock():
            before = self._read(what)
            if version_of(before) != version:
                raise Conflict(f"the {what} files changed while this command ran")
            if what == "users":
                _replace(self.users_file, files[documents.USERS])
                return
            self.dkim_dir.mkdir(parents=True, exist_ok=True)
            # Keys first, the file naming them last, removed keys after: a reload never sees a
            # keys file naming a PEM that is not there.
            for name, data in files.items():
                if name != documents.KEYS and before.get(name) != data:
                    _replace(self.dkim_dir / name, data)
            if documents.KEYS in files:
                _replace(self.dkim_dir / documents.KEYS, files[documents.KEYS])
            for name in set(before) - set(files):
                (self.dkim_dir / name).unlink(missing_ok=True)

    # -- the running services ---------------------------------------------------------------

    def loaded(self, service: str, file: str) -> dict[str, str | None]:
        """process -> SHA-256 of ``file`` it uses (None when it cannot be asked)."""
        port = self.ports.get(f"{service}_http")
        try:
            text = _get(f"http://127.0.0.1:{port}/metrics", {}, timeout=5)[1].decode()
        except (OSError, SiteError):
            return {service: None}
        return {service: parse_loaded(text).get(file)}

    def admin(self, method: str, path: str, body: bytes | None = None, service: str = "relay") -> tuple[int, bytes]:
        token_file = self.run.get("admin_token_file")
        if not token_file or not Path(token_file).exists():
            raise SiteError(f"the {service}'s admin API has no token in this directory (ADMIN_TOKEN_FILE)")
        token = Path(token_file).read_text().strip()
        url = f"http://127.0.0.1:{self.ports[f'{service}_http']}{path}"
        return _request(method, url, {"Authorization": f"Bearer {token}"}, body)

    def status(self) -> dict:
        services = []
        for name in SERVICES:
            port = self.ports.get(f"{name}_http")
            try:
                code, _ = _get(f"http://127.0.0.1:{port}/readyz", {}, timeout=3)
                ready = code == 200
            except (OSError, SiteError):
                ready = False
            services.append({"name": name, "kind": "process", "ready": int(ready), "desired": 1,
                             "autoscaler": None, "disruptions_allowed": None})
        return {"where": str(self.root), "services": services}


def version_of(files: Files) -> str:
    return digest(b"".join(name.encode() + b"\0" + digest(data).encode() for name, data in sorted(files.items())))


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".submitctl-tmp")
    with open(tmp, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
        f.write(data)
    os.replace(tmp, path)


def _request(method: str, url: str, headers: dict[str, str], body: bytes | None = None,
             timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError as e:
        raise SiteError(f"{url}: {e.reason}") from e


def _get(url: str, headers: dict[str, str], timeout: float = 30) -> tuple[int, bytes]:
    return _request("GET", url, headers, timeout=timeout)
