"""The fault scenarios, in the order they run (each leaves the cluster as it found it).

Faults are signals on the instances' real vLLM processes (SIGKILL: a crash; SIGSTOP:
a process that stops answering; SIGCONT: it recovers), or a KV transfer peer that
never answers. The cluster is ``local_config(FAULT_OVERRIDES)``.
"""

from __future__ import annotations

from ..results import Scenario
from .config import FAULT_MAX_MODEL_LEN, FAULT_OVERRIDES
from .crashes import decode_killed_mid_stream, prefill_killed_in_flight
from .stops import decode_stops_answering, prefill_stops_answering, request_deadline
from .transfer import stalled_transfer_peer

FAULT_SCENARIOS: list[Scenario] = [
    prefill_stops_answering,
    stalled_transfer_peer,
    decode_stops_answering,
    request_deadline,
    prefill_killed_in_flight,
    decode_killed_mid_stream,
]

__all__ = [
    "FAULT_MAX_MODEL_LEN",
    "FAULT_OVERRIDES",
    "FAULT_SCENARIOS",
    "decode_killed_mid_stream",
    "decode_stops_answering",
    "prefill_killed_in_flight",
    "prefill_stops_answering",
    "request_deadline",
    "stalled_transfer_peer",
]
