"""Several processes as one run: two CPU processes on 127.0.0.1 (jax.distributed, gloo).

The end-to-end checks start the real launcher (`python -m experiments.main`) as worker
subprocesses with the encoder smoke config on a small synthetic dataset, prepared once
and shared by every run:

  one     1 process, 8 steps                         the reference
  two     2 processes, the same global batch          = one: losses, params, metrics
  two>one the step-4 checkpoint of `two`, resumed in 1 process   = one at step 8  (slow)
  one>two the step-4 checkpoint of `one`, resumed in 2 processes = one at step 8  (slow)

The test split has an odd number of users, so it does not divide over the processes
(and the evaluation batches pad): sharded Recall@K / NDCG@10 must still equal the
single-process ones. Unit tests cover the pipeline's sharding, the process-group
flags, resuming an input position under another process count and the TPU launch
script's commands (dry run).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from user_llm_jax import distributed
from user_llm_jax.data import pipeline
from user_llm_jax.data import transforms as T
from user_llm_jax.train import iterator_state
from tests.test_pipeline import first_items, numbered_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/encoder_movielens.py:smoke"
STEPS, HALF = 8, 4
NUM_USERS = 151  # odd: the test split does not divide over 2 processes
WORKER_TIMEOUT = 240  # seconds per group of workers (a loaded CI machine is slow)
LOSS_ATOL, PARAM_ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------------------
# Worker subprocesses.


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device per process (the test process itself has 8 fake ones).
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV,
               distributed.PROCESS_ID_ENV):
    env.pop(name, None)
  return env


def _common_args(data_root: str, workdir: str) -> list[str]:
  return [
      f"--config={CONFIG}", f"--workdir={workdir}",
      f"--config.data.manual_dir={os.path.join(data_root, 'raw')}",
      f"--config.data.data_dir={os.path.join(data_root, 'data')}",
      f"--config.train.num_steps={STEPS}", "--config.train.warmup=2",
      "--config.train.log_every=1", f"--config.train.eval_every={HALF}",
      f"--config.train.checkpoint_every={HALF}", "--config.eval.batch_size=16",
  ]


def run_workers(workdir: str, num_processes: int, data_root: str, *,
                timeout: float = WORKER_TIMEOUT) -> None:
  """Runs the launcher as `num_processes` processes of one run and waits for all.

  Raises:
    AssertionError: a worker failed or timed out, with every worker's exit status and
      the end of its stderr.
  """
  os.makedirs(workdir, exist_ok=True)
  args = [sys.executable, "-m", "experiments.main", *_common_args(data_root, workdir)]
  if num_processes > 1:
    args += [f"--coordinator_address=127.0.0.1:{_free_port()}",
             f"--num_processes={num_processes}"]
  procs, logs = [], []
  for i in range(num_processes):
    log = open(os.path.join(workdir, f"worker{i}.log"), "w+", encoding="utf-8")
    extra = [f"--process_id={i}"] if num_processes > 1 else []
    procs.append(subprocess.Popen(args + extra, cwd=REPO, env=_worker_env(),
                                  stdout=subprocess.DEVNULL, stderr=log))
    logs.append(log)
  deadline = time.monotonic() + timeout
  timed_out = False
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      timed_out = True
      break
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  reports = []
  for i, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    tail = log.read()[-3000:]
    log.close()
    reports.append(f"--- worker {i} exit status {p.returncode}; stderr tail:\n{tail}")
  if timed_out or any(p.returncode != 0 for p in procs):
    reason = f"timed out after {timeout:.0f} s" if timed_out else "failed"
    pytest.fail(f"{num_processes}-process run in {workdir} {reason}:\n" + "\n".join(reports),
                pytrace=False)


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    return json.load(f)


def model_params(workdir: str, step: int = STEPS) -> dict[str, np.ndarray]:
  """The `model` item of a checkpoint as flat {path: array}."""
  path = os.path.join(workdir, "checkpoints", str(step), "model")
  with ocp.PyTreeCheckpointer() as ckptr:
    # As host arrays: the saved shardings name the devices of the processes that wrote it.
    meta = ckptr.metadata(path)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    tree = ckptr.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}/{k}")
    else:
      flat[prefix] = np.asarray(node)

  walk(tree, "")
  return flat


def max_param_diff(a: str, b: str) -> float:
  pa, pb = model_params(a), model_params(b)
  assert sorted(pa) == sorted(pb)
  assert any(v.size > 1000 for v in pa.values())  # the real model's tables, not a stub
  return max(float(np.max(np.abs(pa[k] - pb[k]))) if pa[k].size else 0.0 for k in pa)


def losses(workdir: str) -> np.ndarray:
  history = summary(workdir)["history"]
  assert [h["step"] for h in history] == list(range(1, STEPS + 1))
  return np.array([h["loss"] for h in history])


def resume_from(src: str, dst: str) -> None:
  """Starts `dst` with the step-HALF checkpoint of `src` alone."""
  os.makedirs(os.path.join(dst, "checkpoints"))
  shutil.copytree(os.path.join(src, "checkpoints", str(HALF)),
                  os.path.join(dst, "checkpoints", str(HALF)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the four runs (module docstring) and the seconds they took."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  from experiments.configs import encoder_movielens  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("distributed")
  data_root = str(root / "shared")
  options = dict(encoder_movielens.get_config("smoke").data.synthetic)
  options.update(num_users=NUM_USERS, show_progress=False)
  synthetic.generate(os.path.join(data_root, "raw"), **options)
  dirs = {name: str(root / name) for name in ("one", "two")}
  dirs["data"] = data_root
  with _timed("1 and 2 processes"):
    run_workers(dirs["one"], 1, data_root)  # also prepares the shared dataset
    run_workers(dirs["two"], 2, data_root)
  return dirs


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
  """Workdirs of the runs resumed under the other process count (module docstring)."""
  root = tmp_path_factory.mktemp("resumed")
  dirs = {name: str(root / name) for name in ("two_to_one", "one_to_two")}
  with _timed("resumed runs"):
    resume_from(runs["two"], dirs["two_to_one"])
    run_workers(dirs["two_to_one"], 1, runs["data"])
    resume_from(runs["one"], dirs["one_to_two"])
    run_workers(dirs["one_to_two"], 2, runs["data"])
  return {**runs, **dirs}


@contextlib.contextmanager
def _timed(what: str):
  """Prints wall and worker CPU seconds (the CPU figure is what an idle machine needs)."""
  t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  yield
  c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
  print(f"\n[{what}] {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} s worker CPU")


class TestTwoProcesses:

  def test_same_losses_and_params_as_one_process(self, runs):
    one, two = summary(runs["one"]), summary(runs["two"])
    assert one["devices"] == 1 and two["devices"] == 2
    loss_diff = float(np.max(np.abs(losses(runs["one"]) - losses(runs["two"]))))
    param_diff = max_param_diff(runs["one"], runs["two"])
    print(f"2 vs 1 process: max |loss diff| {loss_diff:.3g}, max |param diff| "
          f"{param_diff:.3g}")
    assert loss_diff <= LOSS_ATOL
    assert param_diff <= PARAM_ATOL
    # Training moved the parameters: equality is not that of two untrained models.
    assert losses(runs["one"])[-1] < losses(runs["one"])[0]

  def test_sharded_evaluation_equals_single_process(self, runs):
    one, two = summary(runs["one"]), summary(runs["two"])
    num_test = one["metrics"]["num_examples"]
    assert num_test % 2 == 1  # the split does not divide over the processes
    assert two["metrics"]["num_examples"] == num_test  # no padding counted, none dropped
    assert one["dataset"]["statistics"] == two["dataset"]["statistics"]
    for key in ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr",
                "popularity/recall@10", "popularity/ndcg@10"):
      assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    # Validation inside the training loop, on both processes at once.
    assert [e["step"] for e in two["evals"]] == [HALF, STEPS]
    for e1, e2 in zip(one["evals"], two["evals"]):
      for key in ("val/recall@10", "val/ndcg@10"):
        assert e2[key] == pytest.approx(e1[key], abs=1e-6), key

  @pytest.mark.slow
  @pytest.mark.parametrize("name", ["two_to_one", "one_to_two"])
  def test_checkpoint_resumes_under_the_other_process_count(self, resumed, name):
    s = summary(resumed[name])
    assert s["resumed_from"] == HALF
    assert s["devices"] == (1 if name == "two_to_one" else 2)
    loss_diff = float(np.max(np.abs(losses(resumed[name]) - losses(resumed["one"]))))
    param_diff = max_param_diff(resumed[name], resumed["one"])
    print(f"{name}: max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}")
    assert loss_diff <= LOSS_ATOL
    assert param_diff <= PARAM_ATOL
    assert s["metrics"]["recall@10"] == pytest.approx(
        summary(resumed["one"])["metrics"]["recall@10"], abs=1e-6)


# ---------------------------------------------------------------------------------------
# In-process units.


class TestShardingByProcess:
  TRANSFORMS = (T.CropAndPad(max_len=4, max_categories=2),)

  def test_shards_assemble_the_single_process_batches(self):
    src = numbered_source(23)
    kw = dict(seed=3, shuffle=True, num_epochs=None, transforms=self.TRANSFORMS)
    single = iter(pipeline.make_pipeline(src, batch_size=6, shard_index=0, shard_count=1, **kw))
    shards = [iter(pipeline.make_pipeline(src, batch_size=3, shard_index=i, shard_count=2, **kw))
              for i in range(2)]
    for _ in range(10):  # past an epoch boundary
      want = next(single)
      parts = [next(s) for s in shards]
      for key in (T.INPUTS_ITEM, T.LAST_INDEX):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])

  def test_eval_shards_cover_every_record_once_padding_masked(self):
    src = numbered_source(11)
    shards = [list(pipeline.make_eval_pipeline(src, batch_size=2, transforms=self.TRANSFORMS,
                                               shard_index=i, shard_count=3)) for i in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    real = [item for s in shards for item in first_items(s)]
    assert sorted(real) == list(range(11))
    assert sum(int(b[T.EXAMPLE_MASK].sum()) for s in shards for b in s) == 11


class TestProcessGroup:

  def test_flags_then_environment(self):
    env = {distributed.COORDINATOR_ENV: "10.0.0.1:99", distributed.NUM_PROCESSES_ENV: "4",
           distributed.PROCESS_ID_ENV: "3"}
    assert distributed.process_group(environ=env) == distributed.ProcessGroup(
        "10.0.0.1:99", 4, 3)
    assert distributed.process_group("127.0.0.1:5", 2, 1, environ=env) == (
        distributed.ProcessGroup("127.0.0.1:5", 2, 1))
    assert not distributed.process_group(environ={}).explicit  # cluster auto-detection

  @pytest.mark.parametrize("args,match", [
      (("127.0.0.1:5", None, 0), "missing: --num_processes"),
      (("127.0.0.1", 2, 0), "host:port"),
      (("127.0.0.1:5", 2, 2), r"--process_id=2 must be in \[0, --num_processes=2\)"),
      (("127.0.0.1:5", 0, 0), "--num_processes must be >= 1"),
  ])
  def test_bad_groups_are_named(self, args, match):
    with pytest.raises(ValueError, match=match):
      distributed.process_group(*args, environ={})

  def test_bad_environment_value_is_named(self):
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
      distributed.process_group(environ={distributed.NUM_PROCESSES_ENV: "two"})


class TestIteratorStateAnyCount:

  def _iterator(self, batch_size, shard_index, shard_count):
    return iter(pipeline.make_pipeline(
        numbered_source(40), batch_size=batch_size, seed=1, shuffle=True, num_epochs=None,
        transforms=[T.CropAndPad(4, 2)], shard_index=shard_index, shard_count=shard_count))

  def test_two_process_position_resumes_in_one(self, tmp_path):
    for i in range(2):
      it = self._iterator(2, i, 2)
      for _ in range(3):
        next(it)
      (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
    single = self._iterator(4, 0, 1)
    want = [next(single)[T.INPUTS_ITEM] for _ in range(4)][3]
    restored = iterator_state.AnyCountHandler().restore(
        tmp_path, args=iterator_state.RestoreAnyCount(self._iterator(4, 0, 1)))
    np.testing.assert_array_equal(next(restored)[T.INPUTS_ITEM], want)

  def test_disagreeing_positions_are_refused(self, tmp_path):
    for i, steps in enumerate((2, 3)):
      it = self._iterator(2, i, 2)
      for _ in range(steps):
        next(it)
      (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
    with pytest.raises(ValueError, match="positions differ"):
      iterator_state.AnyCountHandler().restore(
          tmp_path, args=iterator_state.RestoreAnyCount(self._iterator(4, 0, 1)))

  def test_own_file_is_grains(self, tmp_path):
    it = self._iterator(4, 0, 1)
    next(it)
    grain.checkpoint.CheckpointHandler().save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
    want = next(it)[T.INPUTS_ITEM]
    restored = iterator_state.AnyCountHandler().restore(
        tmp_path, args=iterator_state.RestoreAnyCount(self._iterator(4, 0, 1)))
    np.testing.assert_array_equal(next(restored)[T.INPUTS_ITEM], want)


class TestTpuLaunchDryRun:
  SCRIPT = os.path.join(REPO, "experiments", "tpu", "launch.sh")

  def _commands(self, tmp_path, *args, **env):
    # A `gcloud` on PATH that fails loudly: a dry run must never call it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "gcloud"
    fake.write_text("#!/bin/sh\necho 'gcloud called in a dry run' >&2\nexit 7\n")
    fake.chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "DRY_RUN": "1", **env}
    out = subprocess.run(["bash", self.SCRIPT, *args], env=full_env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), out.stdout
    return [shlex.split(line[2:]) for line in lines]

  def test_same_command_on_every_worker(self, tmp_path):
    cmds = self._commands(
        tmp_path, f"--config={CONFIG}", "--config.name=a b's run",
        TPU_NAME="user-llm", ZONE="us-central2-b", ACCELERATOR="v4-32", PROJECT="proj",
        DELETE="1", WORKDIR="/mnt/shared/run1")
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert [c[4] for c in gcloud] == ["create", "scp", "ssh", "delete"]
    create, scp, ssh, delete = gcloud
    assert "--accelerator-type=v4-32" in create and "--zone=us-central2-b" in create
    assert all("--project=proj" in c for c in gcloud)
    assert "--worker=all" in scp and "--worker=all" in ssh
    assert "--quiet" in delete
    command = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
    # What every worker runs, as its shell will split it.
    remote = shlex.split(command.split("&& python3 -m experiments.main", 1)[1])
    assert remote == ["--workdir=/mnt/shared/run1", "--distributed", f"--config={CONFIG}",
                      "--config.name=a b's run"]
    tar = next(c for c in cmds if c[0] == "tar")
    assert tar[tar.index("-czf") + 1] == scp[5]  # the archive built is the one copied

  def test_single_host_reuse_without_group(self, tmp_path):
    cmds = self._commands(tmp_path, TPU_NAME="t", ZONE="z", CREATE="0", DISTRIBUTED="0")
    assert [c[4] for c in cmds if c[0] == "gcloud"] == ["scp", "ssh"]
    ssh = cmds[-1]
    command = next(a for a in ssh if a.startswith("--command="))
    assert "--distributed" not in command
    assert shlex.split(command.split("experiments.main", 1)[1]) == ["--workdir=$HOME/runs/t"]

  def test_gcs_workdir_installs_the_gcs_extra_on_the_workers(self, tmp_path):
    def install(workdir):
      cmds = self._commands(tmp_path, TPU_NAME="t", ZONE="z", CREATE="0", WORKDIR=workdir)
      command = next(a for a in cmds[-1] if a.startswith("--command="))[len("--command="):]
      pip = shlex.split(command.split("pip install", 1)[1].split("&&", 1)[0])
      return pip
    assert install("gs://bucket/runs/a") == ["-q", "-e", ".[gcs]", "jax[tpu]==0.10.2"]
    assert install("/mnt/shared/a") == ["-q", "-e", ".", "jax[tpu]==0.10.2"]

  def test_missing_name_is_reported(self, tmp_path):
    out = subprocess.run(["bash", self.SCRIPT], env={**os.environ, "DRY_RUN": "1",
                                                     "ZONE": "z", "TPU_NAME": ""},
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr
