#!/opt/venv/bin/python
"""TLS certificates and tokens for a dyadlab deployment (docs/security.md), in one folder.

    dyadlab-pki DIR [--namespace NS ...]

makes, unless DIR/ca.pem exists already (then it changes nothing):

    ca.pem, ca.key                   the deployment's CA
    <service>.pem, <service>.key     extractor, smiles, stats, synth: server certificates
                                     (also their client certificates), DNS names: the
                                     service, and <service>.<NS>.svc[.cluster.local] per NS
    smiles.token, synth.token        the tokens these services send to the extractor (role service)
    cli.token                        the token of the command line / cohort Jobs (role analyst)
    access                           every server's access file (token digests, no secrets)

Keys, tokens and the access file are 0600 (the containers all run as uid 10001). Uses
dyadlab.security's own CA and certificate functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dyadlab import security as S

SERVICES = ("extractor", "smiles", "stats", "synth")
#: token holder -> role (docs/security.md: service may call the extractor; analyst the analyses)
TOKENS = {"smiles": "service", "synth": "service", "cli": "analyst"}


def make(d: Path, namespaces: list[str]) -> bool:
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.pem").exists():
        return False
    ca_cert, ca_key = S.make_ca("dyadlab deployment CA")
    for name in SERVICES:
        dns = [name] + [f"{name}.{ns}.svc{tail}" for ns in namespaces for tail in ("", ".cluster.local")]
        cert, key = S.issue_cert(ca_cert, ca_key, name, dns=dns, ips=[])
        (d / f"{name}.pem").write_bytes(cert)
        S.write_private(d / f"{name}.key", key)
    lines = ["# credential  role  name   (written by dyadlab-pki)"]
    for holder, role in TOKENS.items():
        tok = S.new_token()
        S.write_private(d / f"{holder}.token", tok + "\n")
        lines.append(f"sha256:{S.token_digest(tok)} {role} {holder}")
    S.write_private(d / "access", "\n".join(lines) + "\n")
    (d / "ca.pem").write_bytes(ca_cert)  # last: its presence means "complete"
    S.write_private(d / "ca.key", ca_key)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dyadlab-pki", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dir")
    ap.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="Kubernetes namespace whose service DNS names the certificates carry",
    )
    a = ap.parse_args(argv)
    made = make(Path(a.dir), a.namespace)
    print(f"dyadlab-pki: {'made' if made else 'kept the existing'} CA, certificates and tokens in {a.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
