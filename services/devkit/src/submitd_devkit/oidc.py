"""An OpenID Connect provider someone else wrote, for the tests and for trying OAuth by hand:
``oidc-provider-mock`` (Flask and Authlib) served on 127.0.0.1 in a process of its own, so that a
test can stop it (a provider down) or restart it (new signing keys, every token it issued gone).

It offers discovery, a JWKS, the authorization-code flow (its authorize form is POSTed here with a
``sub``), opaque access tokens its ``/userinfo`` checks, ID tokens signed with its RSA key (JWTs
whose ``aud`` is the client id) and revocation of a user's tokens. It has no introspection
endpoint: ``/introspect`` here is a small RFC 7662 one in front of it, answering from its
userinfo, for a client that authenticates with the id and secret it was started with.

    python -m submitd_devkit.oidc serve --port 9400
    python -m submitd_devkit.oidc token alice@example.test --port 9400   # prints a signed ID token
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .ports import free_port, wait_port
from .stack import kill_group

REDIRECT = "http://127.0.0.1/callback"  # never visited: the code is read from the redirect


@dataclass
class Tokens:
    access_token: str = field(repr=False)  # opaque: checked at /userinfo
    id_token: str = field(repr=False)  # a JWT signed with the provider's key, aud = the client id
    expires_in: int = 0


class ProviderClient:
    """What a user and a test do with a running provider: get tokens, set claims, revoke."""

    def __init__(self, port: int) -> None:
        self.port = port

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _request(self, method: str, path: str, form: dict | None = None, body: bytes | None = None,
                 headers: dict | None = None) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.body = response.read()
        connection.close()
        return response

    def tokens(self, sub: str, *, client_id: str = "submitd", scope: str = "openid email profile") -> Tokens:
        """A user's tokens, as a mail client gets them: the authorization-code flow, the user's
        consent given by POSTing the authorize form with their ``sub``."""
        query = urllib.parse.urlencode({"client_id": client_id, "redirect_uri": REDIRECT, "response_type": "code",
                                        "scope": scope, "state": secrets.token_urlsafe(8)})
        consent = self._request("POST", f"/oauth2/authorize?{query}", form={"sub": sub})
        location = consent.getheader("Location") or ""
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("code")
        if consent.status != 302 or not code:
            raise RuntimeError(f"authorize: HTTP {consent.status}")
        answer = self._request("POST", "/oauth2/token", form={
            "grant_type": "authorization_code", "code": code[0], "redirect_uri": REDIRECT,
            "client_id": client_id, "client_secret": "any"})
        if answer.status != 200:
            raise RuntimeError(f"token: HTTP {answer.status}")
        data = json.loads(answer.body)
        return Tokens(data["access_token"], data["id_token"], int(data["expires_in"]))

    def set_user(self, sub: str, claims: dict) -> None:
        """The claims the provider states for ``sub`` (email, preferred_username, ...)."""
        answer = self._request("PUT", f"/users/{urllib.parse.quote(sub)}", body=json.dumps(claims).encode(),
                               headers={"Content-Type": "application/json"})
        assert answer.status == 204, answer.status

    def revoke(self, sub: str) -> None:
        """The provider's revocation: every access token of ``sub`` stops working at /userinfo."""
        answer = self._request("POST", f"/users/{urllib.parse.quote(sub)}/revoke-tokens")
        assert answer.status == 204, answer.status


class OidcProvider(ProviderClient):
    """The provider's process (``start``, ``stop``, ``restart``) and policy's settings for it."""

    def __init__(self, root: Path, port: int = 0, *, token_lifetime: int = 3600) -> None:
        """``root``: where its log and the introspection client's secret go."""
        super().__init__(port or free_port())
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_lifetime = token_lifetime
        self.client_id = "submitd-policy"  # the introspection client
        self.secret_file = self.root / "introspection-secret"
        if not self.secret_file.exists():
            self.secret_file.write_text(secrets.token_urlsafe(18) + "\n")
            self.secret_file.chmod(0o600)
        self.proc: subprocess.Popen | None = None

    def start(self, token_lifetime: int | None = None) -> OidcProvider:
        """A new provider on the same port: new signing key, no token of an earlier one."""
        if token_lifetime is not None:
            self.token_lifetime = token_lifetime
        with open(self.root / "oidc.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "submitd_devkit.oidc", "serve", "--port", str(self.port), "--token-lifetime",
                 str(self.token_lifetime), "--client-id", self.client_id, "--secret-file", str(self.secret_file)],
                stdout=log, stderr=log, start_new_session=True)
        if not wait_port("127.0.0.1", self.port, 30):
            self.stop()
            raise RuntimeError(f"the OIDC provider did not start; see {self.root / 'oidc.log'}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc.wait()
            self.proc = None

    def restart(self, token_lifetime: int | None = None) -> OidcProvider:
        self.stop()
        return self.start(token_lifetime)

    def policy_settings(self, mode: str, **more) -> dict:
        """Policy's settings for this provider (``Stack(env={"policy": ...})``)."""
        values = {"oauth_mode": mode, "oauth_issuer": self.issuer, "oauth_allow_insecure_http": True,
                  "oauth_audience": ["submitd"]}
        if mode == "introspection":
            values |= {"oauth_introspection_url": f"{self.issuer}/introspect", "oauth_client_id": self.client_id,
                       "oauth_client_secret_file": str(self.secret_file)}
        return values | more


def serve(port: int, token_lifetime: int, client_id: str, secret: str) -> None:
    """The provider in this process (the ``python -m`` entry): runs until killed."""
    import warnings
    from datetime import timedelta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Authlib's deprecation notices, not ours to act on
        import oidc_provider_mock
        import werkzeug.serving
        import werkzeug.test
        from werkzeug.wrappers import Request, Response

    provider = oidc_provider_mock.app(access_token_max_age=timedelta(seconds=token_lifetime))
    inside = werkzeug.test.Client(provider)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/introspect":
            return provider(environ, start_response)
        request = Request(environ)
        auth = request.authorization
        if request.method != "POST" or auth is None or (auth.username, auth.password) != (client_id, secret):
            return Response(json.dumps({"error": "invalid_client"}), 401, mimetype="application/json")(
                environ, start_response)
        userinfo = inside.get("/userinfo", headers={"Authorization": f"Bearer {request.form.get('token', '')}"})
        answer = {"active": False}
        if userinfo.status_code == 200:
            answer = {**userinfo.json, "active": True, "iss": request.host_url.rstrip("/"), "token_type": "Bearer"}
        return Response(json.dumps(answer), mimetype="application/json")(environ, start_response)

    server = werkzeug.serving.make_server("127.0.0.1", port, app, threaded=True)
    print(f"OpenID Connect provider: http://127.0.0.1:{port} (introspection client {client_id})", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m submitd_devkit.oidc",
                                     description="oidc-provider-mock on 127.0.0.1, with RFC 7662 introspection")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the provider until killed")
    run.add_argument("--port", type=int, default=9400)
    run.add_argument("--token-lifetime", type=int, default=3600)
    run.add_argument("--client-id", default="submitd-policy")
    run.add_argument("--secret-file", help="the introspection client's secret (default: a new one, printed)")
    token = commands.add_parser("token", help="print a user's token from a running provider")
    token.add_argument("sub", help="the user (the provider gives it an email claim of the same value)")
    token.add_argument("--port", type=int, default=9400)
    token.add_argument("--access", action="store_true", help="the opaque access token (default: the signed ID token)")
    args = parser.parse_args()
    if args.command == "token":
        tokens = ProviderClient(args.port).tokens(args.sub)
        print(tokens.access_token if args.access else tokens.id_token)
        return
    secret = Path(args.secret_file).read_text().strip() if args.secret_file else secrets.token_urlsafe(18)
    if not args.secret_file:
        print(f"introspection client secret: {secret}", flush=True)
    serve(args.port, args.token_lifetime, args.client_id, secret)


if __name__ == "__main__":
    main()
