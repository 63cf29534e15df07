"""Transport security, authentication, authorization and the audit log.

Everything here follows docs/security.md; the environment variables are in
dyadlab/config.py.

* **TLS** on every gRPC server and client. A server uses DYADLAB_TLS_CERT /
  DYADLAB_TLS_KEY; DYADLAB_TLS_CLIENT_AUTH=require makes it mutual TLS
  (client certificates signed by DYADLAB_TLS_CA). With no certificate
  configured, a server bound to loopback uses the **local development
  credentials**: a per-user CA (its DNS names constrained to localhost), a loopback certificate and two tokens, generated once with
  `cryptography` under DYADLAB_LOCAL_DIR (default ~/.config/dyadlab/local,
  0700, keys and tokens 0600). Clients trust that CA for loopback addresses
  only. A server never listens in plaintext unless DYADLAB_INSECURE says so
  (`1`: loopback only; `any`: any address), and never binds a non-loopback
  address with the local certificate.
* **Authentication**: a bearer token (`authorization: Bearer ...`, from the
  file DYADLAB_TOKEN_FILE names) or, under mutual TLS, the client
  certificate's identity (a DNS/URI SAN or the CN). The server's access file
  (DYADLAB_AUTH_TOKENS) maps credentials to a role:

      # credential                      role      name (shown in the audit log)
      sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  analyst  alice
      Zq3...a-long-random-token          service   smiles
      cert:smiles.dyadlab.svc            service   smiles

  Tokens are compared by SHA-256 digest in constant time and never logged.
* **Authorization**: one table, ROLES (role -> methods; every method of the
  dyadlab services is in it, from their descriptors). Health and reflection
  stay open (probes, grpcurl). No credentials: UNAUTHENTICATED; a role that
  may not call the method: PERMISSION_DENIED.
* **Audit log**: one JSON line per RPC (health checks excepted) to its own
  stream (DYADLAB_AUDIT_LOG: a file, or stderr): time, service, method, who
  (role, name, how authenticated: never a token), the peer address, the
  object keys asked for (shortened content hashes: never a name or path),
  status and duration.

The modules, one job each: addresses (loopback or not), pki (keys,
certificates, tokens, private files), local_dev (the local development
credentials), access (roles, principals, the access file), audit (the audit
log), interceptor (the server's AuthInterceptor), server (a server's security
from the settings), client (a client's), cli (python -m dyadlab.security, and
`dyadlab status`'s line). Every public name is here, as dyadlab.security.X.
"""

from __future__ import annotations

from dyadlab.security.access import (
    ADMIN_ONLY,
    OPEN_METHODS,
    PROTO_SERVICES,
    ROLES,
    UNAUDITED,
    AccessTable,
    Principal,
    allowed,
    method_path,
)
from dyadlab.security.addresses import host_of, is_loopback
from dyadlab.security.audit import MAX_AUDIT_KEYS, audit_logger, object_keys, short_key
from dyadlab.security.cli import describe, main
from dyadlab.security.client import ClientSecurity, client_security
from dyadlab.security.interceptor import AuthInterceptor, caller, caller_name, peer_identities
from dyadlab.security.local_dev import LOCAL_RENEW_DAYS, LOCAL_USER_ROLE, Local, ensure_local, local
from dyadlab.security.pki import issue_cert, make_ca, new_token, token_digest, write_private
from dyadlab.security.server import ServerSecurity, server_access, server_security, server_transport

__all__ = [
    "caller",
    "caller_name",
    "ADMIN_ONLY",
    "OPEN_METHODS",
    "PROTO_SERVICES",
    "ROLES",
    "UNAUDITED",
    "AccessTable",
    "Principal",
    "allowed",
    "method_path",
    "host_of",
    "is_loopback",
    "MAX_AUDIT_KEYS",
    "audit_logger",
    "object_keys",
    "short_key",
    "describe",
    "main",
    "ClientSecurity",
    "client_security",
    "AuthInterceptor",
    "peer_identities",
    "LOCAL_RENEW_DAYS",
    "LOCAL_USER_ROLE",
    "Local",
    "ensure_local",
    "local",
    "issue_cert",
    "make_ca",
    "new_token",
    "token_digest",
    "write_private",
    "ServerSecurity",
    "server_access",
    "server_security",
    "server_transport",
]
