"""CurveZMQ for relay links: the off-loader's key pinned by relays, relay keys on an allow-list.

Certificates are ZeroMQ's text files (``NAME.key`` public, ``NAME.key_secret`` secret), made by
`tempo keys generate`. Off by default (one host, loopback); turn it on for the network set-up.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def generate(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Create a key pair; return (public file, secret file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path}: {exc}") from None


def _load_pair(secret_file: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file; an error if it holds no secret key."""
    public, secret = _load(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return public, secret


def serve(ctx: zmq.Context, sock: zmq.Socket, secret_file: str | Path, allow_dir: str | Path) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that admits only clients whose public key is in `allow_dir`."""
    if not Path(allow_dir).is_dir():
        raise ValueError(f"CURVE allow-list {allow_dir} is not a directory of public keys")
    public, secret = _load_pair(secret_file)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allow_dir))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def connect_as(sock: zmq.Socket, secret_file: str | Path, server_public_file: str | Path) -> None:
    """Make `sock` a CURVE client with its own key pair, pinning the server's public key."""
    public, secret = _load_pair(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = _load(server_public_file)[0]
