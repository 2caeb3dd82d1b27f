"""Fault injection for tests/faults, loaded into the server and its training children via PYTHONPATH.

Only what cannot be produced for real on demand is injected here:
- GPT_SERVICE_TEST_SAVE_LOG=FILE: each checkpoint or adapter save appends a line to FILE when its
  files are written but not yet published, then waits GPT_SERVICE_TEST_SAVE_SECONDS, so a test can
  kill or cancel the trainer in the middle of a save.
- GPT_SERVICE_TEST_ENOSPC_AFTER=N: the save after N checkpoints fails with ENOSPC, where no small
  tmpfs can be mounted to fill for real.
"""

import errno
import os

if os.environ.get("GPT_SERVICE_TEST_SAVE_LOG") or os.environ.get("GPT_SERVICE_TEST_ENOSPC_AFTER"):
    import time

    import torch

    _save = torch.save
    _saves = {"count": 0}

    def _instrumented_save(obj: object, f: object, *args: object, **kwargs: object) -> object:
        if str(f).endswith("optimizer.pt"):
            limit = os.environ.get("GPT_SERVICE_TEST_ENOSPC_AFTER")
            if limit and _saves["count"] >= int(limit):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            _saves["count"] += 1
        result = _save(obj, f, *args, **kwargs)
        log = os.environ.get("GPT_SERVICE_TEST_SAVE_LOG")
        if log and str(f).endswith("rng_state.pt"):
            with open(log, "a") as handle:
                handle.write(f"{f}\n")
            time.sleep(float(os.environ.get("GPT_SERVICE_TEST_SAVE_SECONDS", "3")))
        return result

    torch.save = _instrumented_save
