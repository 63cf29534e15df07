#!/bin/sh
# Trust the extra CA certificates in $1/*.crt (PEM) for this build stage only.
set -eu
dir=${1:?usage: trust-ca.sh DIR}
ls "$dir"/*.crt >/dev/null 2>&1 || exit 0
if command -v update-ca-certificates >/dev/null 2>&1; then
    cp "$dir"/*.crt /usr/local/share/ca-certificates/
    update-ca-certificates >/dev/null
else
    cat "$dir"/*.crt >> /etc/ssl/certs/ca-certificates.crt
fi
echo "trusting $(ls "$dir"/*.crt | wc -l) extra CA certificate(s) while building"
