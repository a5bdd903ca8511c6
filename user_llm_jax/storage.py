"""Local or remote (`gs://...`) paths behind one set of calls, through `etils.epath`.

Workdirs, checkpoints, prepared data and TensorBoard logs may live in a Cloud Storage
bucket, as MaxText's do. Without TensorFlow, `epath` reaches `gs://` through fsspec's
`gcsfs` (the `[gcs]` extra); Orbax writes array data through TensorStore's own GCS
driver, ArrayRecord reads records through its own C++ GCS client, and tensorboardX writes
event files through `google-cloud-storage`. Local paths behave exactly as before.

Cloud Storage has no rename and no partial objects: an object appears whole when its
upload finishes, so `write_atomic` writes a remote object directly, and a local file
through a temporary file and a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable

from etils import epath

# Object-store schemes `epath` maps onto fsspec file systems, with the package each needs.
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
STAGING_ENV = "USER_LLM_JAX_STAGING"
MIRROR_MARKER = "mirrored_from.json"


class RemoteStorageError(RuntimeError):
  """A remote path that cannot be used (unknown scheme, missing client package)."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URI (`gs://bucket/...`) rather than a local path."""
  return "://" in os.fspath(path)


def check(path: str | os.PathLike, what: str = "path") -> None:
  """Raises a clear error when `path` is remote and its client package is missing.

  Args:
    path: the path to check (local paths always pass).
    what: what the path is, for the message (e.g. "--workdir").

  Raises:
    RemoteStorageError: an unsupported scheme, or its fsspec package is not installed.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme = path.split("://", 1)[0]
  if scheme not in _BACKENDS:
    raise RemoteStorageError(
        f"{what} {path!r}: unsupported scheme {scheme}:// (supported: "
        + ", ".join(f"{s}://" for s in _BACKENDS) + ", or a local path)")
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec(_BACKENDS[scheme]) is None:
    extra = " (pip install -e '.[gcs]')" if scheme == "gs" else ""
    raise RemoteStorageError(
        f"{what} {path!r} needs the {_BACKENDS[scheme]!r} package{extra}")


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (`~` expanded); a remote URI unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  """Creates a directory and its parents (remote: nothing to create, prefixes are implicit)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` so that readers never see a partial file.

  Local: a temporary file beside `path`, then a rename. Remote: one object upload, which
  becomes visible only when complete.
  """
  if isinstance(data, str):
    data = data.encode("utf-8")
  path = os.fspath(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def remove(path: str | os.PathLike) -> None:
  """Deletes a file if it exists."""
  p = epath.Path(path)
  if p.exists():
    p.unlink()


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
  """Paths under `directory` matching `pattern` (no `**`), as strings, sorted."""
  directory = os.fspath(directory)
  if not is_remote(directory):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(os.path.join(glob_lib.escape(directory), pattern)))
  return sorted(os.fspath(p) for p in epath.Path(directory).glob(pattern))


def staging_dir(remote: str) -> str:
  """A local directory standing for `remote` on this machine (stable across runs).

  Work that needs local files (generating raw data, writing ArrayRecord files) happens
  there before its result is copied up. Root: `$USER_LLM_JAX_STAGING`, else
  `~/.cache/user_llm_jax/staging`.
  """
  root = os.environ.get(STAGING_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "user_llm_jax", "staging")
  scheme, rest = os.fspath(remote).split("://", 1)
  parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
  return os.path.join(root, scheme, *parts)


def _local_files(directory: str) -> Iterable[str]:
  """Relative paths of the files under a local directory, sorted."""
  for d, _, names in sorted(os.walk(directory)):
    for name in sorted(names):
      yield os.path.relpath(os.path.join(d, name), directory)


def tree_digest(directory: str) -> str:
  """sha256 of a local directory's relative file names and contents."""
  digest = hashlib.sha256()
  for rel in _local_files(directory):
    if rel == MIRROR_MARKER:
      continue
    digest.update(rel.encode() + b"\0")
    with open(os.path.join(directory, rel), "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def copy_tree(local_dir: str, dst_dir: str | os.PathLike) -> None:
  """Copies every file under a local directory to `dst_dir` (local or remote)."""
  for rel in _local_files(local_dir):
    dst = epath.Path(dst_dir) / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Streamed in chunks: prepared splits can be large.
    epath.Path(os.path.join(local_dir, rel)).copy(dst, overwrite=True)


def mirrored_digest(remote_dir: str) -> str | None:
  """The digest `mirror` recorded in `remote_dir`, or None (no marker, or unreadable)."""
  marker = epath.Path(remote_dir) / MIRROR_MARKER
  if not marker.exists():
    return None
  try:
    return json.loads(marker.read_text()).get("digest")
  except (ValueError, AttributeError):
    return None


def mirror(local_dir: str, remote_dir: str) -> bool:
  """Copies a local directory tree to `remote_dir` unless it already holds the same files.

  The marker `mirrored_from.json` (the tree's digest) is written last, so an interrupted
  copy is redone by the next call and a complete one is skipped.

  Returns:
    Whether files were copied.
  """
  digest = tree_digest(local_dir)
  if mirrored_digest(remote_dir) == digest:
    return False
  copy_tree(local_dir, remote_dir)
  write_atomic(os.fspath(epath.Path(remote_dir) / MIRROR_MARKER),
               json.dumps({"digest": digest, "source": local_dir}))
  return True


def _remote_files(remote_dir: str) -> list[str]:
  """Relative paths of the files under a remote directory (recursive), sorted."""
  out, pending = [], [(epath.Path(remote_dir), "")]
  while pending:
    directory, prefix = pending.pop()
    for p in directory.iterdir():
      rel = f"{prefix}{p.name}"
      if p.is_dir():
        pending.append((p, rel + "/"))
      else:
        out.append(rel)
  return sorted(out)


def local_copy(remote_dir: str) -> str:
  """A local copy of a mirrored remote tree, in its `staging_dir`; returns that directory.

  Training reads prepared records in shuffled random order; opened on gs://, ArrayRecord
  makes a ranged network request per record, so each host reads from a local copy. The
  copy is reused while its digest equals the one `mirror` recorded (so the host that
  prepared the data, whose staging copy it is, downloads nothing); otherwise the tree is
  fetched into a fresh directory that replaces the old one only when complete.
  """
  local = staging_dir(remote_dir)
  want = mirrored_digest(remote_dir)
  if want and os.path.isdir(local) and tree_digest(local) == want:
    return local
  partial = local + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  for rel in _remote_files(remote_dir):
    if rel == MIRROR_MARKER:
      continue
    dst = os.path.join(partial, *rel.split("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    (epath.Path(remote_dir) / rel).copy(dst, overwrite=True)
  shutil.rmtree(local, ignore_errors=True)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  os.replace(partial, local)
  return local


def download_dir(remote_dir: str) -> str:
  """Copies the files directly under a remote directory to its `staging_dir`; returns it."""
  local = staging_dir(remote_dir)
  os.makedirs(local, exist_ok=True)
  for p in epath.Path(remote_dir).iterdir():
    if p.is_file():
      p.copy(os.path.join(local, p.name), overwrite=True)
  return local
