"""Ask a cluster's Ray actors about themselves, from a second Ray driver."""

from __future__ import annotations

import json
import subprocess
import sys

from pd.serve_process import PdServeProcess

_SCRIPT = (
    "import json, ray\n"
    "ray.init(address='auto', namespace='pd', logging_level='ERROR')\n"
    "infos = {}\n"
    "for name in ('pd-prefill-0', 'pd-decode-0'):\n"
    "    info = ray.get(ray.get_actor(name).info.remote())\n"
    "    infos[name] = {'state': info.state, 'url': info.url, 'pid': info.pid,\n"
    "                   'niceness': info.niceness}\n"
    "print(json.dumps(infos))\n"
)


def actor_infos(serve: PdServeProcess) -> dict[str, dict]:
    """Each instance actor's state, URL, vLLM pid and niceness, as Ray's actors report
    them (``ray_env`` points ``address='auto'`` at this cluster and no other)."""
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120,
        env=serve.ray_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
