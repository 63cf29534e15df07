#!/usr/bin/env bash
# The Secrets the manifests expect, for one namespace:
#
#   deploy/k8s/make-secrets.sh NAMESPACE [--s3]
#
# dyadlab-pki: a new CA, the services' certificates (DNS names: the service,
# and <service>.NAMESPACE.svc[.cluster.local]), the tokens of smiles, synth
# and the command line / cohort Jobs, and the access file (docs/security.md),
# made by deploy/docker/base/pki.py. The CA's private key does NOT go into
# the cluster: everything is also kept in ./dyadlab-pki-NAMESPACE/ (0700) --
# keep that folder offline; it signs renewals. --s3: also dyadlab-s3 with
# random S3 credentials (prod: rather your secret manager's).
# Needs kubectl and the project venv (make setup), or PYTHON=... with dyadlab.
set -euo pipefail
cd "$(dirname "$0")/../.."
ns=${1:?usage: make-secrets.sh NAMESPACE [--s3]}
py=${PYTHON:-.venv/bin/python}
out=./dyadlab-pki-$ns
umask 077
"$py" deploy/docker/base/pki.py "$out" --namespace "$ns"
files=()
for f in "$out"/*; do
  [ "$(basename "$f")" = ca.key ] || files+=(--from-file="$f")
done
kubectl -n "$ns" create secret generic dyadlab-pki "${files[@]}" --dry-run=client -o yaml \
  | kubectl apply -f -
if [ "${2:-}" = --s3 ]; then
  key=$("$py" -c 'import secrets; print(secrets.token_urlsafe(32))')
  kubectl -n "$ns" create secret generic dyadlab-s3 --from-literal=DYADLAB_S3_ACCESS_KEY=dyadlab \
    --from-literal=DYADLAB_S3_SECRET_KEY="$key" --dry-run=client -o yaml | kubectl apply -f -
fi
echo "Secrets in $ns; the CA key stays in $out (keep it offline)"
