#!/opt/venv/bin/python
"""synth's model archives between the object store and TorchServe's model store.

    dyadlab-models fetch [--key KEY] [--dir DIR]   the init step: the archive -> DIR
    dyadlab-models publish MODEL.pt                 package an exported model, upload it,
                                                    print its store key
    dyadlab-models list                             the archives in the store

`fetch` takes --key, else DYADLAB_SYNTH_ARCHIVE, else the only archive under
synth/archives/ (several: it lists them and fails, so a deployment always
says which model it serves). The download is checked against the digest in
its key (services.synth.archive.fetch); other archives in DIR are removed.
Store settings: DYADLAB_S3_* and DYADLAB_BUCKET (dyadlab.config).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EX_CONFIG = 78  # sysexits: configuration error (no archive, ambiguous archive)


def _store():
    from dyadlab.config import Settings
    from dyadlab.storage import open_store

    return open_store(Settings.from_env())


def _archives(store) -> list[str]:
    from services.synth import archive

    return sorted(k for k in store.list(archive.PREFIX) if k.endswith(".mar"))


def cmd_fetch(args) -> int:
    from services.synth import archive

    store = _store()
    key = args.key or os.environ.get("DYADLAB_SYNTH_ARCHIVE", "").strip()
    if not key:
        keys = _archives(store)
        if len(keys) != 1:
            found = "\n  ".join(keys) or "(none)"
            print(
                f"dyadlab-models: {len(keys)} archives under {archive.PREFIX} in bucket "
                f"{store.bucket!r}; set DYADLAB_SYNTH_ARCHIVE to one of:\n  {found}\n"
                "(publish one with `dyadlab-models publish MODEL.pt`)",
                file=sys.stderr,
            )
            return EX_CONFIG
        key = keys[0]
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        local = archive.fetch(store, key, out)
    except archive.ArchiveNotFound as e:
        print(f"dyadlab-models: {e}", file=sys.stderr)
        return EX_CONFIG
    for old in out.glob("*.mar"):
        if old != local:
            old.unlink()
    print(f"dyadlab-models: {key} -> {local} ({local.stat().st_size} bytes)")
    return 0


def cmd_publish(args) -> int:
    import tempfile

    from services.synth import archive

    store = _store()
    with tempfile.TemporaryDirectory() as tmp:
        mar = archive.build(args.model, tmp, args.name)
        key = archive.publish(store, mar)
    print(key)
    return 0


def cmd_list(args) -> int:
    for k in _archives(_store()):
        print(k)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dyadlab-models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="copy the archive from the object store into DIR")
    f.add_argument("--key", help="store key synth/archives/<name>-<sha12>.mar")
    f.add_argument("--dir", default=os.environ.get("TS_MODEL_STORE", "/var/lib/torchserve/model-store"))
    p = sub.add_parser("publish", help="package an exported synth model and upload it")
    p.add_argument("model", help="an exported model (python -m services.synth.train ... --export)")
    p.add_argument("--name", default="synth")
    sub.add_parser("list", help="archives in the object store")
    args = ap.parse_args(argv)
    return {"fetch": cmd_fetch, "publish": cmd_publish, "list": cmd_list}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
