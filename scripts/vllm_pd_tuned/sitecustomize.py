"""Neutralizes stock vLLM P/D's two CPU defects, for bench_serving.py's tuned row.

Loaded by every Python process of a `vllm serve` started with this folder on
PYTHONPATH. It changes nothing else:
1. NIXL 1.5.1's Python API fixes the UCX progress thread's delay at 0 (a core spinning
   per agent): agents are rebuilt with a 1 ms delay, as pd's own are.
2. vLLM's NIXL worker pins the model thread to the machine's last core: that one
   sched_setaffinity call is ignored, so VLLM_CPU_OMP_THREADS_BIND decides.
"""

import os
import sys

_original_setaffinity = os.sched_setaffinity


def _setaffinity_unless_nixl_worker(pid, mask):
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.endswith("kv_connector.v1.nixl.base_worker"):
        return None
    return _original_setaffinity(pid, mask)


os.sched_setaffinity = _setaffinity_unless_nixl_worker

try:
    import nixl._api as _api
except Exception:  # no NIXL here: nothing to patch
    _api = None

if _api is not None:
    import importlib

    _bindings = importlib.import_module(_api.nixl_agent.__module__.rsplit(".", 1)[0] + "._bindings")
    _original_init = _api.nixl_agent.__init__

    def _init_with_progress_delay(self, agent_name, nixl_conf=None, instantiate_all=False):
        conf = nixl_conf or _api.nixl_agent_config()
        backends = list(conf.backends)
        conf.backends = []
        _original_init(self, agent_name, conf, False)
        config = _bindings.nixlAgentConfig()
        config.useProgThread = conf.enable_pthread
        config.useListenThread = conf.enable_listen
        config.listenPort = conf.port
        default_sync = (
            _api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
            if conf.enable_listen
            else _api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE
        )
        config.syncMode = (conf.sync_mode or default_sync).value
        config.pthrDelay = 1000
        config.lthrDelay = 100000
        config.captureTelemetry = conf.capture_telemetry
        self.agent = _bindings.nixlAgent(agent_name, config)
        self.plugin_list = self.agent.getAvailPlugins()
        for backend in backends:
            init = {"num_threads": str(conf.num_threads)} if conf.num_threads > 0 else {}
            self.create_backend(backend, init)

    _api.nixl_agent.__init__ = _init_with_progress_delay

print("vllm_pd_tuned: NIXL progress delay 1 ms, NIXL worker core pinning off", file=sys.stderr)
