"""A Grain iterator position that resumes on any number of processes.

Grain's Orbax handler writes one file per process, `process_<i>-of-<P>.json`, and reads
back only the file of the same `i` and `P`, so a run checkpointed by two processes could
not resume in one. The input pipeline (`data.pipeline`) shards whole batches, which puts
every process at the same position (the index of its next local batch, i.e. of the next
global batch) whatever P is: `RestoreAnyCount` reads this process's own file when it
exists and otherwise the position all the saved processes agree on.
Saving (`SaveAnyCount`) writes Grain's own files, so checkpoints stay readable by Grain's
handler and earlier checkpoints by this one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class AnyCountHandler(grain.checkpoint.CheckpointHandler):
  """Grain's handler, restoring a position saved by a different number of processes."""

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
    item = item or args.item
    own = epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item)
    saved = sorted(epath.Path(directory).glob("process_*-of-*.json"))
    if not saved:
      raise ValueError(f"{directory} holds no Grain iterator state (process_*-of-*.json)")
    states = {f.name: json.loads(f.read_text()) for f in saved}
    distinct = {json.dumps(s, sort_keys=True) for s in states.values()}
    if len(distinct) != 1:
      raise ValueError(
          f"{directory}: the saved processes' input positions differ ({states}); they "
          f"cannot be resumed by {jax.process_count()} process(es), only by as many as "
          "wrote them")
    if not isinstance(item, grain.DatasetIterator):
      raise ValueError(f"{directory}: resuming with a different process count needs a "
                       f"grain.DatasetIterator, got {type(item).__name__}")
    item.set_state(json.loads(distinct.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(AnyCountHandler, for_save=True)
@dataclasses.dataclass
class SaveAnyCount(ocp.args.CheckpointArgs):
  """Save argument of a Grain iterator item (`AnyCountHandler`, Grain's file format).

  Attributes:
    item: the iterator whose position is saved.
  """

  item: Any


@ocp.args.register_with_handler(AnyCountHandler, for_restore=True)
@dataclasses.dataclass
class RestoreAnyCount(ocp.args.CheckpointArgs):
  """Restore argument of a Grain iterator item (`AnyCountHandler`).

  Attributes:
    item: the iterator to reposition in place.
  """

  item: Any
