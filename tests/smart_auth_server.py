"""A real SMART authorization server for the tests: `oidc-provider` (npm) under Node 20+.

tests/smart_auth/ holds its configuration (server.mjs) and the locked npm packages; they are
installed with `npm ci` into the workspace's `.cache/smart-auth/` when missing or when the
lockfile changed (`.ci/run` does the same first). Nothing is issued by test code: tokens come
from the server's own authorization and token endpoints, through its login form.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "smart_auth"
INSTALL = ROOT / ".cache" / "smart-auth"
FHIR_PATH = "/fhir"
START_TIMEOUT_S = 60.0
INTROSPECTION_CLIENT = "fhir-dm-rs"


@dataclass(frozen=True)
class SmartApp:
    """One registered SMART app client: its redirect URL, token format and lifetime."""

    client_id: str
    redirect_uri: str
    token_format: str = "jwt"  # or "opaque" (introspected)
    ttl_seconds: int = 3600


def install() -> Path:
    """`npm ci` the locked packages into .cache/smart-auth (once per lockfile); its path."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("Node.js 20+ and npm are needed (Debian: apt-get install nodejs npm)")
    lock = (SOURCE / "package-lock.json").read_bytes()
    stamp = INSTALL / ".installed-lock"
    if not (stamp.exists() and stamp.read_bytes() == lock):
        INSTALL.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(SOURCE / name, INSTALL / name)
        subprocess.run(  # a fixed command on the committed lockfile
            [npm, "ci", "--no-audit", "--no-fund", "--cache", str(ROOT / ".cache" / "npm")],
            cwd=INSTALL,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        stamp.write_bytes(lock)
    shutil.copyfile(SOURCE / "server.mjs", INSTALL / "server.mjs")
    return INSTALL


def launch_id(patient: str) -> str:
    """An EHR launch id naming the patient in context (base64url JSON, as the launcher's)."""
    raw = json.dumps({"patient": patient}).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class SmartAuthServer:
    """Starts the authorization server bound to 127.0.0.1 on `port`.

    Usage::

        server = SmartAuthServer(port, apps=[SmartApp("fhir-dm", "http://127.0.0.1:8080/app/")],
                                 scopes="patient/*.rs user/*.rs", log=tmp / "auth.log")
        server.start()
        server.iss            # the FHIR endpoint the app is launched with (its smart-configuration)
        server.stop()
    """

    def __init__(
        self, port: int, *, apps: Sequence[SmartApp], scopes: str, log: Path, secret: str
    ) -> None:
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.iss = self.issuer + FHIR_PATH
        self.smart_configuration_url = self.iss + "/.well-known/smart-configuration"
        self.introspection_client = INTROSPECTION_CLIENT
        self.introspection_secret = secret
        self._config = {
            "port": port,
            "fhirPath": FHIR_PATH,
            "scopes": scopes,
            "apps": [
                {
                    "clientId": a.client_id,
                    "redirectUri": a.redirect_uri,
                    "format": a.token_format,
                    "ttl": a.ttl_seconds,
                }
                for a in apps
            ],
            "introspection": {"clientId": INTROSPECTION_CLIENT, "secret": secret},
        }
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        directory = install()
        node = shutil.which("node") or "node"
        env = {**os.environ, "SMART_AUTH_CONFIG": json.dumps(self._config)}
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(  # a fixed script and configuration
                [node, "server.mjs"], cwd=directory, env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if requests.get(self.smart_configuration_url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass  # not listening yet
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the authorization server did not start:\n" + self.log_text())
            time.sleep(0.2)

    def log_text(self) -> str:
        return self._log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)
        self._process = None
