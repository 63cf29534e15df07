"""Who may call what: the roles (built from the protos' service descriptors),
the principals a call is made by, and the access file that maps credentials
to roles."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import importlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from dyadlab import services
from dyadlab.config import ConfigError

log = logging.getLogger("dyadlab.security")


# -- roles -------------------------------------------------------------------------------
#: methods anyone may call: probes and API discovery. gRPC's own protocols,
#: named one by one: Health/List is not open, and grpc.reflection.v1 has no
#: descriptor in grpcio-reflection.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
#: not written to the audit log (probes call them every few seconds)
UNAUDITED = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: every dyadlab service of the registry (dyadlab.services); each of their
#: methods is an analysis (role analyst) unless ADMIN_ONLY names it
PROTO_SERVICES: tuple[ServiceDescriptor, ...] = tuple(
    importlib.import_module(s.pb2).DESCRIPTOR.services_by_name[s.proto_service] for s in services.SERVICES
)
_EXTRACTOR = PROTO_SERVICES[services.NAMES.index("extractor")]


def method_path(method: MethodDescriptor) -> str:
    """The path a call names: '/dyadlab.v1.Smiles/Analyze'."""
    return f"/{method.containing_service.full_name}/{method.name}"


#: methods of PROTO_SERVICES that are not analyses: only admin ("*") may call them
ADMIN_ONLY: frozenset[str] = frozenset()
_ANALYSIS = frozenset(method_path(m) for s in PROTO_SERVICES for m in s.methods) - ADMIN_ONLY
#: role -> the methods it may call ("*": every method)
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "analyst": _ANALYSIS,
    # what one service calls on another: smiles and synth -> extractor
    "service": frozenset(method_path(_EXTRACTOR.methods_by_name[n]) for n in ("Extract", "ImportOpenFace")),
}


def allowed(role: str, method: str) -> bool:
    methods = ROLES.get(role, frozenset())
    return "*" in methods or method in methods


# -- the access file -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Principal:
    role: str | None  # None: authenticated (certificate) but without a role
    name: str
    via: str  # "token" | "cert"

    def audit(self) -> dict:
        return {"role": self.role, "name": self.name, "via": self.via}


class AccessTable:
    """Credentials -> roles, from an access file (see dyadlab.security's docstring)."""

    def __init__(self, tokens: list[tuple[bytes, Principal]], certs: dict[str, Principal]):
        self._tokens = tokens
        self._certs = certs

    @classmethod
    def load(cls, path: str | os.PathLike) -> AccessTable:
        path = Path(path)
        try:
            text = path.read_text()
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"access file {path}: cannot read it ({e.strerror})") from None
        if mode & 0o077:
            log.warning(
                "access file is readable by other users; make it 0600", extra={"mode": oct(mode & 0o777)}
            )
        tokens: list[tuple[bytes, Principal]] = []
        certs: dict[str, Principal] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # comments: '#' after a blank
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2:
                raise ConfigError(f"access file {path}, line {n}: want CREDENTIAL ROLE [NAME]")
            cred, role = parts[0], parts[1]
            name = " ".join(parts[2:])
            if role not in ROLES:
                raise ConfigError(
                    f"access file {path}, line {n}: unknown role {role!r} (roles: {', '.join(sorted(ROLES))})"
                )
            if cred.startswith("cert:"):
                ident = cred[5:]
                if not ident:
                    raise ConfigError(f"access file {path}, line {n}: empty certificate identity")
                certs[ident] = Principal(role, name or ident, "cert")
            elif cred.startswith("sha256:"):
                hexd = cred[7:].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", hexd):
                    raise ConfigError(f"access file {path}, line {n}: sha256: needs 64 hex digits")
                tokens.append((bytes.fromhex(hexd), Principal(role, name or f"token:{hexd[:8]}", "token")))
            else:
                if len(cred) < 16:  # the message never repeats the token
                    raise ConfigError(
                        f"access file {path}, line {n}: token shorter than 16 "
                        "characters (make one: python -m dyadlab.security token)"
                    )
                d = hashlib.sha256(cred.encode()).digest()
                tokens.append((d, Principal(role, name or f"token:{d.hex()[:8]}", "token")))
        return cls(tokens, certs)

    def by_token(self, token: str) -> Principal | None:
        """Constant time in the token: every entry is compared, digest against digest."""
        d = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, principal in self._tokens:
            if hmac.compare_digest(d, digest) and found is None:
                found = principal
        return found

    def by_identities(self, identities: Iterable[str]) -> Principal | None:
        for ident in identities:
            if ident in self._certs:
                return self._certs[ident]
        return None
