#!/bin/sh
# Serve synth's archive from the model store (filled by `dyadlab-models fetch`).
set -eu
store=${TS_MODEL_STORE:-/var/lib/torchserve/model-store}
name=${DYADLAB_SYNTH_TS_MODEL:-synth}
n=$(find "$store" -maxdepth 1 -name '*.mar' | wc -l)
if [ "$n" -ne 1 ]; then
    echo "dyadlab-torchserve: expected one model archive in $store, found $n;" \
         "the init step (dyadlab-models fetch) puts synth's archive there" >&2
    exit 78
fi
mar=$(basename "$(find "$store" -maxdepth 1 -name '*.mar')")
cd /var/lib/torchserve
echo "dyadlab-torchserve: serving $name=$mar"
# --foreground: the launcher waits for java; tini -g (the entrypoint) sends
# SIGTERM to both, and TorchServe stops its workers.
exec torchserve --start --foreground --ncs --ts-config /etc/torchserve/config.properties \
    --model-store "$store" --models "$name=$mar"
