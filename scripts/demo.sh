#!/usr/bin/env bash
# The demo behind `make demo`: start the local stack (every service its own
# process on loopback, local-directory object store), analyse a real video,
# print the per-smile table, write a plot; with the synth model served, turn a
# real face photo into an avImage matrix (valence x arousal); stop the stack.
set -euo pipefail
video=${1:?usage: scripts/demo.sh VIDEO}
out=${DEMO_OUT:-demo-out}
export DYADLAB_HOME=${DYADLAB_HOME:-$PWD/.cache/demo-home}
dyadlab=.venv/bin/dyadlab
mkdir -p "$out"
$dyadlab up
trap '$dyadlab down' EXIT
$dyadlab status
$dyadlab extract "$video" --out "$out/frames.csv"
$dyadlab smiles "$video" --out "$out/smiles.csv" --plot "$out/smiles.png"
face=${DEMO_FACE:-$(dirname "$video")/single_face.jpg}
status=$($dyadlab status || true)
if [ -f "$face" ] && grep -Eq '^synth +[^ ]+ +SERVING' <<<"$status"; then
  $dyadlab synth matrix "$face" --out "$out/avimage.png"
  echo "avImage matrix: $out/avimage.png"
fi
echo
echo "frame table: $out/frames.csv   smiles: $out/smiles.csv   plot: $out/smiles.png"
