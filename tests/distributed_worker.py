"""One process of a two-process `jreason.distributed` check (run by tests/test_distributed.py).

    python tests/distributed_worker.py COORDINATOR PROCESS_ID RUN_DIR

Both processes join over `COORDINATOR`, then check what one process alone cannot: initialize is
idempotent and refuses a different layout; a barrier that process 1 never reaches times out on
process 0 with an error naming process 1; a later barrier still works; process 1 logs warnings
only; a vote or a SIGTERM on process 1 alone becomes the same decision on both; a checkpoint
that only process 1 cannot read is skipped by both. Prints one JSON line of findings for the test
to assert on.
"""

import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np

from jreason import distributed

coordinator, pid, run_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
out = {"first": distributed.initialize(coordinator, 2, pid)}
out["again"] = distributed.initialize(coordinator, 2, pid)
out["again_from_env_or_nothing"] = distributed.initialize()
try:
    distributed.initialize(coordinator, 2, 1 - pid)
    out["other_layout"] = "accepted"
except RuntimeError as e:
    out["other_layout"] = str(e)
distributed.setup_logging()
logging.getLogger("worker").info("info line from process %d", pid)
logging.getLogger("worker").warning("warning line from process %d", pid)
out["is_main"] = distributed.is_main()

if pid == 0:
    try:
        distributed.barrier("only_process_0_comes", timeout_s=2)
        out["timeout"] = None
    except distributed.BarrierTimeout as e:
        out["timeout"] = str(e)
distributed.barrier("both_come", timeout_s=60)
out["after"] = "passed"

# unanimous decisions: process 1 alone votes True in round 1, then gets a SIGTERM at step 3
out["votes"] = [distributed.any_process(pid == 1 and i == 1, "vote") for i in range(3)]
import jax  # noqa: E402 - after initialize

from jreason.train import checkpoint as ckpt_lib  # noqa: E402

with ckpt_lib.PreemptionFlag() as flag:
    out["stopped_at"] = None
    for step in range(1, 7):
        if pid == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            flag.event.wait(10)
        if flag.agreed():
            out["stopped_at"] = step
            break

# two checkpoints; the newest one's data item is corrupt for process 1 only
mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def state_at(step):
    w = np.full((4,), float(step), np.float32)
    return {"w": jax.make_array_from_callback(w.shape, replicated, lambda idx: w[idx])}


ckpt = ckpt_lib.Checkpointer(run_dir, async_save=False)
for step in (1, 2):
    ckpt.save(step, state_at(step), {"position": step}, {})
ckpt.wait()
distributed.barrier("saved", timeout_s=60)
if pid == 1:
    (run_dir / "checkpoints" / "2" / "data" / "process_1-of-2.json").write_text("{")
distributed.barrier("corrupted", timeout_s=60)
abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=replicated)}
step, state, data = ckpt.restore_latest(abstract)
out["restored"] = [step, data["position"], float(np.asarray(state["w"].addressable_data(0))[0])]
ckpt.close()
print(json.dumps(out), flush=True)
