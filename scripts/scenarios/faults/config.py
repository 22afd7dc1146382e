"""The cluster the fault scenarios run on."""

from __future__ import annotations

from typing import Any

# configs/local.yaml with deadlines short enough that faults resolve in seconds, and
# the tiny model's whole context (4096): a stream long enough to outlast its deadline
# even on a fast machine.
FAULT_MAX_MODEL_LEN = 4096
FAULT_OVERRIDES: dict[str, Any] = {
    "engine_args": {"max_model_len": FAULT_MAX_MODEL_LEN},
    "timeouts": {"health_interval_s": 1, "request_s": 20, "drain_s": 5},
    "connector": {"handshake_timeout_s": 2, "transfer_timeout_s": 4, "lease_timeout_s": 10},
    "ray": {"max_restarts": 20},
}
