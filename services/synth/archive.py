"""synth model archives (.mar) for TorchServe: build, publish to the object store, fetch.

    mar = build("models/synth/synth-128-mask.pt", "/tmp/out")          # -> /tmp/out/synth.mar
    key = publish(store, mar)                                    # synth/archives/synth-<sha12>.mar
    local = fetch(store, key, model_store_dir)                   # model_store_dir/synth-<sha12>.mar
    TorchServe(workdir, model_store_dir, {"synth": local.name}).start()

What the archive holds (the worker needs nothing from the repo):

* ``synth_handler.py``   services/synth/handler.py, the entry point (class SynthHandler)
* ``services/synth/*.py`` generate, solver, model, losses, data, landmarks, colour, paste (+ the
  package ``__init__``s). TorchServe's worker puts the unpacked archive
  directory on sys.path before site-packages, so ``services.synth.generate``
  imports the archive's copy even where the repo is pip-installed too.
* ``model.pt``          the exported model (train.export), the serializedFile
* ``model-config.yaml`` batchSize / maxBatchDelay / workers / responseTimeout,
  and ``handler: {threads: N}`` for the handler's torch.set_num_threads

Store keys are content addresses: ``synth/archives/<name>-<sha12>.mar`` where
sha12 = the first 12 hex digits of `archive_digest` -- a SHA-256 over the
archive's member names and bytes with the manifest's build time left out, so
rebuilding the same model with the same code gives the same key (publish skips
the upload) and any change gives a new one. `fetch` checks the digest of what
it downloads against the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from dyadlab import storage
from dyadlab import torchserve as T

HERE = Path(__file__).resolve().parent
PREFIX = "synth/archives/"
HANDLER_NAME = "synth_handler.py"
SERIALIZED_NAME = "model.pt"
#: the modules the handler imports inside the worker (services.synth.*)
MODULES = (
    "generate.py",
    "solver.py",
    "model.py",
    "losses.py",
    "data.py",
    "landmarks.py",
    "colour.py",
    "paste.py",
)
_KEY = re.compile(r"^synth/archives/(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)-(?P<sha>[0-9a-f]{12})\.mar$")

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_DELAY_MS = 20
DEFAULT_RESPONSE_TIMEOUT_S = 120


class ArchiveNotFound(storage.NotFound):
    """The archive is not in the object store."""


class ArchiveCorrupt(storage.StoreError):
    """What the store returned is not the archive its key names."""


def model_config_yaml(
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS,
    workers: int = 1,
    threads: int = 1,
    response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S,
) -> str:
    for n, v in (
        ("batch_size", batch_size),
        ("workers", workers),
        ("threads", threads),
        ("response_timeout_s", response_timeout_s),
    ):
        if int(v) < 1:
            raise ValueError(f"{n} must be >= 1, got {v}")
    if int(max_batch_delay_ms) < 0:
        raise ValueError(f"max_batch_delay_ms must be >= 0, got {max_batch_delay_ms}")
    return (
        f"# written by services/synth/archive.py\n"
        f"minWorkers: {int(workers)}\nmaxWorkers: {int(workers)}\n"
        f"batchSize: {int(batch_size)}\nmaxBatchDelay: {int(max_batch_delay_ms)}\n"
        f"responseTimeout: {int(response_timeout_s)}\n"
        f"handler:\n  threads: {int(threads)}\n"
    )


def build(
    model_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "synth",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS,
    workers: int = 1,
    threads: int = 1,
    response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S,
    version: str = "1.0",
    check: bool = True,
) -> Path:
    """Package `model_file` (train.export's format) as out_dir/<name>.mar.

    check=True loads the model once here (Synthesizer.load) so a bad file fails
    now with a clear message, not later inside a TorchServe worker."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"synth model file {model_file} does not exist")
    if check:
        from services.synth.generate import Synthesizer

        Synthesizer.load(model_file)
    with tempfile.TemporaryDirectory(prefix="synth-mar-") as tmp:
        stage = Path(tmp)
        pkg = stage / "pkg"
        (pkg / "services" / "synth").mkdir(parents=True)
        (pkg / "services" / "__init__.py").write_text("")
        (pkg / "services" / "synth" / "__init__.py").write_text("")
        for m in MODULES:
            shutil.copy2(HERE / m, pkg / "services" / "synth" / m)
        shutil.copy2(HERE / "handler.py", stage / HANDLER_NAME)
        try:
            os.link(model_file, stage / SERIALIZED_NAME)
        except OSError:
            shutil.copy2(model_file, stage / SERIALIZED_NAME)
        cfg = stage / "model-config.yaml"
        cfg.write_text(
            model_config_yaml(batch_size, max_batch_delay_ms, workers, threads, response_timeout_s)
        )
        return T.build_mar(
            name, version, stage / SERIALIZED_NAME, stage / HANDLER_NAME, [pkg], out_dir, config_file=cfg
        )


def archive_digest(mar_path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the archive's content: member names and bytes in name
    order, MANIFEST.json without its build time ("createdOn")."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(mar_path) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                data = z.read(info)
                if info.filename == "MAR-INF/MANIFEST.json":
                    manifest = json.loads(data)
                    manifest.pop("createdOn", None)
                    data = json.dumps(manifest, sort_keys=True).encode()
                h.update(info.filename.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ArchiveCorrupt(f"{mar_path} is not a valid model archive: {e}") from e
    return h.hexdigest()


def manifest(mar_path: str | os.PathLike) -> dict:
    with zipfile.ZipFile(mar_path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))


def archive_key(mar_path: str | os.PathLike) -> str:
    """synth/archives/<model name>-<sha12>.mar for this archive."""
    name = manifest(mar_path)["model"]["modelName"]
    return f"{PREFIX}{name}-{archive_digest(mar_path)[:12]}.mar"


def publish(store: storage.ObjectStore, mar_path: str | os.PathLike) -> str:
    """Put the archive in the store under its content key (skipped when already
    there with the same size); returns the key."""
    key = archive_key(mar_path)
    size = os.path.getsize(mar_path)
    if store.size(key) != size:
        store.put_file(key, mar_path)
    return key


def fetch(store: storage.ObjectStore, key: str, model_store_dir: str | os.PathLike) -> Path:
    """Download `key` into model_store_dir (atomically, as <name>-<sha12>.mar)
    and check it is the archive the key names. A file already there with the
    right digest is reused. Raises ArchiveNotFound when the store lacks it."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a synth archive key: {key!r} (expected {PREFIX}<name>-<sha12>.mar)")
    dest = Path(model_store_dir) / key.rsplit("/", 1)[1]
    if dest.is_file():
        try:
            if archive_digest(dest).startswith(m["sha"]):
                return dest
        except ArchiveCorrupt:
            pass
    if not store.exists(key):
        raise ArchiveNotFound(
            f"model archive {key!r} is not in the object store (bucket "
            f"{store.bucket!r}); build and publish it first "
            f"(services.synth.archive.build + publish; `dyadlab up` does it "
            f"from DYADLAB_SYNTH_MODEL)"
        )
    store.get_file(key, dest)
    digest = archive_digest(dest)
    if not digest.startswith(m["sha"]):
        dest.unlink(missing_ok=True)
        raise ArchiveCorrupt(f"{key}: downloaded archive has digest {digest[:12]}, not {m['sha']}")
    return dest
