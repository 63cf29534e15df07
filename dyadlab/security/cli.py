"""The command line that makes credentials for a deployment (python -m
dyadlab.security), and the security line of `dyadlab status`."""

from __future__ import annotations

from pathlib import Path

from dyadlab.config import Settings
from dyadlab.security.local_dev import local
from dyadlab.security.pki import issue_cert, make_ca, new_token, token_digest, write_private


def describe(settings: Settings, audit_log: str = "") -> str:
    """One line for `dyadlab status`: transport, authentication, audit log."""
    if settings.insecure:
        transport = "plaintext (DYADLAB_INSECURE)"
    elif settings.tls_cert:
        transport = "mutual TLS" if settings.tls_client_auth == "require" else "TLS"
    else:
        transport = f"TLS with the local development CA ({local(settings).dir})"
    auth = (
        "off (DYADLAB_AUTH=off)"
        if not settings.auth
        else "tokens/certificates from DYADLAB_AUTH_TOKENS"
        if settings.auth_tokens
        else "local tokens"
    )
    return f"{transport}; authentication {auth}; audit log {audit_log or settings.audit_log or 'stderr'}"


# -- command line: credentials for a deployment ------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """python -m dyadlab.security ca DIR | cert DIR NAME [--dns D ...] [--ip I ...] | token"""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m dyadlab.security", description="make TLS certificates and tokens for a deployment"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ca", help="a new CA: DIR/ca.pem, DIR/ca.key (0600)")
    c.add_argument("dir")
    c.add_argument("--days", type=int, default=3650)
    s = sub.add_parser("cert", help="a certificate signed by DIR's CA: DIR/NAME.pem, DIR/NAME.key")
    s.add_argument("dir")
    s.add_argument("name", help="common name, e.g. the service's DNS name")
    s.add_argument("--dns", action="append", default=[])
    s.add_argument("--ip", action="append", default=[])
    s.add_argument("--days", type=int, default=397)
    sub.add_parser("token", help="print a new token and the access-file line for it")
    a = p.parse_args(argv)
    if a.cmd == "ca":
        d = Path(a.dir)
        d.mkdir(parents=True, exist_ok=True)
        cert, key = make_ca("dyadlab CA", days=a.days)
        (d / "ca.pem").write_bytes(cert)
        write_private(d / "ca.key", key)
        print(f"wrote {d / 'ca.pem'} and {d / 'ca.key'}")
    elif a.cmd == "cert":
        d = Path(a.dir)
        cert, key = issue_cert(
            (d / "ca.pem").read_bytes(),
            (d / "ca.key").read_bytes(),
            a.name,
            dns=[a.name, *a.dns],
            ips=a.ip,
            days=a.days,
        )
        (d / f"{a.name}.pem").write_bytes(cert)
        write_private(d / f"{a.name}.key", key)
        print(f"wrote {d / (a.name + '.pem')} and {d / (a.name + '.key')}")
    else:
        tok = new_token()
        print(f"token (give it to the client, in the file DYADLAB_TOKEN_FILE names): {tok}")
        print(f"access-file line (server, DYADLAB_AUTH_TOKENS): sha256:{token_digest(tok)} ROLE NAME")
    return 0
