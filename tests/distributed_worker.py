"""One process of a two-process `jreason.distributed` check (run by tests/test_distributed.py).

    python tests/distributed_worker.py COORDINATOR PROCESS_ID

Both processes join over `COORDINATOR`, then check what one process alone cannot: initialize is
idempotent and refuses a different layout; a barrier that process 1 never reaches times out on
process 0 with an error naming process 1; a later barrier still works; process 1 logs warnings
only. Prints one JSON line of findings for the test to assert on.
"""

import json
import logging
import sys

from jreason import distributed

coordinator, pid = sys.argv[1], int(sys.argv[2])
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
print(json.dumps(out), flush=True)
