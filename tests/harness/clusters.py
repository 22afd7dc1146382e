"""pd-serve clusters for tests, started once per config and shared by every module.

``ClusterPool.get(config)`` returns the running cluster of that config, ready, or
stops the one running (of another config) and starts it: one cluster at a time, as
two cores and the engines' memory allow, and modules that ask for the same config
share one start-up (a module that stopped its cluster gets a fresh one next time).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pd.serve_process import PdServeProcess, local_config
from scripts.scenarios.bounds import REJOIN_S
from scripts.scenarios.faults import FAULT_OVERRIDES

LOCAL = local_config()  # configs/local.yaml as a user starts it
CONCURRENT_FLOW = local_config({"proxy": {"flow": "concurrent"}})
FIRST_TOKEN_FLOW = local_config({"proxy": {"flow": "first-token"}})
FAULTS = local_config(FAULT_OVERRIDES)  # short deadlines: faults resolve in seconds


class ClusterPool:
    started: ClassVar[int] = 0  # pd-serve start-ups this session (reported by conftest)

    def __init__(self) -> None:
        self._key: str | None = None
        self._serve: PdServeProcess | None = None

    def get(self, config: dict[str, Any], timeout_s: float = 600) -> PdServeProcess:
        key = json.dumps(config, sort_keys=True)
        if key == self._key and self._serve is not None and self._serve.running():
            try:  # a module before may have left it healing (an instance restarting)
                return self._serve.wait_ready(timeout_s=REJOIN_S)
            except (RuntimeError, TimeoutError):
                pass  # broken: start a fresh one
        self.close()
        self._key, self._serve = key, PdServeProcess(config).start()
        ClusterPool.started += 1
        return self._serve.wait_ready(timeout_s=timeout_s)

    def close(self) -> None:
        if self._serve is not None:
            self._serve.stop()  # SIGINT, then SIGKILL of all it started
        self._key = self._serve = None
