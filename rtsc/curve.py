"""CURVE encryption and authentication for the ZeroMQ sockets (optional).

Off by default: the sockets bind to loopback. When the publisher is reached over a
network, config ``publish.curve_secret_key`` (the server's ``.key_secret`` certificate)
and ``publish.curve_clients_dir`` (a folder of allowed clients' public ``.key``
certificates) switch both sockets to CURVE: traffic is encrypted and a client whose
public key is not in the folder (or that has no keys) completes no handshake and
receives nothing. Certificates are the files :func:`zmq.auth.create_certificates`
writes (``rtsc keys DIR NAME`` makes a pair).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rtsc.errors import RtscError

log = logging.getLogger(__name__)


def _load(path: str | Path, key: str, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise RtscError(f"{key}: cannot read the CURVE certificate {str(path)!r}: {exc}") from exc
    if need_secret and not secret:
        raise RtscError(f"{key}: {str(path)!r} holds no secret key (give the .key_secret file)")
    return public, secret


@dataclass(frozen=True)
class CurveServer:
    """Server side: the key pair and the folder of allowed client public keys.

    Parameters
    ----------
    secret_key_file : path
        The server's ``.key_secret`` certificate.
    clients_dir : path
        Folder of allowed clients' public ``.key`` certificates.
    """

    secret_key_file: str
    clients_dir: str

    @classmethod
    def from_config(cls, publish: Any) -> "CurveServer | None":
        """From ``publish.curve_secret_key`` / ``publish.curve_clients_dir`` (None: off)."""
        secret = getattr(publish, "curve_secret_key", None)
        clients = getattr(publish, "curve_clients_dir", None)
        if secret is None and clients is None:
            return None
        if secret is None or clients is None:
            raise RtscError("publish.curve_secret_key and publish.curve_clients_dir: give both "
                            "to enable CURVE, or neither")
        return cls(secret, clients)

    def start(self, ctx: "zmq.Context[Any]") -> ThreadAuthenticator:
        """Start the ZAP authenticator on ``ctx`` (stop it when the context closes)."""
        if not Path(self.clients_dir).is_dir():
            raise RtscError(f"publish.curve_clients_dir: {self.clients_dir!r} is not a folder")
        _load(self.secret_key_file, "publish.curve_secret_key", need_secret=True)
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("rtsc.curve.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=self.clients_dir)
        return auth

    def apply(self, sock: "zmq.Socket[Any]") -> None:
        """Make ``sock`` (before bind) a CURVE server."""
        public, secret = _load(self.secret_key_file, "publish.curve_secret_key", True)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True


@dataclass(frozen=True)
class CurveClient:
    """Client side: this client's key pair and the server's public key.

    Parameters
    ----------
    secret_key_file : path
        This client's ``.key_secret`` certificate (its public key must be in the
        server's ``curve_clients_dir``).
    server_public_key_file : path
        The server's public ``.key`` certificate.
    """

    secret_key_file: str
    server_public_key_file: str

    def apply(self, sock: "zmq.Socket[Any]") -> None:
        """Configure ``sock`` (before connect) as a CURVE client."""
        public, secret = _load(self.secret_key_file, "client secret key", need_secret=True)
        server_public, _ = _load(self.server_public_key_file, "server public key", False)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def create_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` in ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    return Path(public), Path(secret)
