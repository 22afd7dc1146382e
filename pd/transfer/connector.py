"""The documented import path of pd's KV connector: ``pd.transfer.connector:PDConnector``.

vLLM loads a connector by module path, and users' ``--kv-transfer-config`` names this
one. The connector itself assembles the prefill and decode roles, so it lives above
them (``pd.connector.connector``); pd.transfer is the layer below the roles and
imports neither. This module only forwards the name, and does so lazily (a module
``__getattr__``, PEP 562): importing pd.transfer, or this module, pulls in no role;
asking for ``PDConnector``, as vLLM does, imports the connector then. It is the one
place below the roles that names the layer above, and it holds no code of its own
(tests/test_import_direction.py checks both).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "PDConnector":
        from pd.connector.connector import PDConnector

        return PDConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
