"""Dependencies point one way (DESIGN.md): cli -> cluster/proxy -> the connector ->
prefill/decode -> transfer, over a base of shared modules. Every module in pd/ is
parsed (ast, no import) and each of its imports checked against the layer table."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PD = Path(__file__).resolve().parents[1] / "pd"

# Highest layer first. A module may import its own unit and any unit of a lower
# layer; never a higher one, nor another unit of its own layer.
LAYERS: list[list[str]] = [
    ["pd.cli", "pd.serve_process"],
    ["pd.cluster", "pd.proxy"],
    ["pd.connector"],
    ["pd.prefill", "pd.decode", "pd.store"],
    ["pd.transfer"],
    ["base"],
]
# The modules every layer may use; they import only each other.
BASE = {
    "pd", "pd.envs", "pd.log", "pd.registry", "pd.models", "pd.vllm_server", "pd.guardian",
    "pd.routing_settings",
}  # fmt: skip
# pd.transfer.connector keeps the documented path ``pd.transfer.connector:PDConnector``
# and forwards it, lazily, to the connector above the roles: the one import allowed
# to point up, and only from inside a function (importing pd.transfer loads no role).
LAZY_ALIASES = {("pd.transfer.connector", "pd.connector.connector")}


def unit_of(module: str) -> str | None:
    if module in BASE:
        return "base"
    for layer in LAYERS:
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return unit
    return None


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def module_sources() -> dict[str, str]:
    sources = {}
    for path in sorted(PD.rglob("*.py")):
        parts = path.relative_to(PD.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text()
    return sources


def imports(module: str, source: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported pd module, line, whether at module level) for every import of pd code."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as module level
        if isinstance(node, ast.If):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # pd imports absolutely: a relative import is reported as such
                base = "." * node.level + base
            # `from pd import envs` imports the module pd.envs
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]  # fmt: skip
        for name in names:
            if name == "pd" or name.startswith(("pd.", ".")):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    known = set(sources)
    problems = []
    for module, source in sources.items():
        unit = unit_of(module)
        if unit is None:
            problems.append(f"{module}: in no layer; add it to LAYERS or BASE in {__file__}")
            continue
        for target, line, at_module_level in imports(module, source, known):
            target_unit = unit_of(target)
            if target_unit is None:
                problems.append(f"{module}:{line} imports {target}, which is in no layer")
            elif target_unit == unit:
                continue
            elif unit == "base" or layer_of(target_unit) <= layer_of(unit):
                if (module, target) in LAZY_ALIASES and not at_module_level:
                    continue
                problems.append(f"{module}:{line} imports {target} ({unit} -> {target_unit})")
    return problems


def test_every_import_points_down() -> None:
    assert violations(module_sources()) == []


def test_an_upward_import_is_caught() -> None:
    sources = module_sources()
    added = {
        "pd.transfer.lease": "from pd.decode.kv_consumer import KVConsumer\n",
        "pd.prefill.kv_producer": "import pd.decode.kv_consumer\n",
        "pd.cluster.plan": "def f():\n    from pd.proxy import routing\n",
        "pd.envs": "from pd.transfer import params\n",
        "pd.transfer.connector": "from pd.connector.connector import PDConnector\n",
    }
    for module, line in added.items():
        sources[module] = line + sources[module]
    found = violations(sources)
    assert len(found) == len(added), found
    for module, target in [
        ("pd.transfer.lease", "pd.decode.kv_consumer"),
        ("pd.prefill.kv_producer", "pd.decode.kv_consumer"),  # a peer of the same layer
        ("pd.cluster.plan", "pd.proxy.routing"),  # inside a function counts too
        ("pd.envs", "pd.transfer.params"),
        ("pd.transfer.connector", "pd.connector.connector"),  # the alias, but eagerly
    ]:
        assert any(f.startswith(module) and f" imports {target} " in f for f in found), found


def test_a_module_outside_the_table_is_reported() -> None:
    sources = {**module_sources(), "pd.kv_store.tiers": "import os\n"}
    assert violations(sources) == [
        f"pd.kv_store.tiers: in no layer; add it to LAYERS or BASE in {__file__}"
    ]


def test_the_documented_connector_path_loads_no_role_until_asked() -> None:
    """vLLM imports ``pd.transfer.connector``, then asks it for ``PDConnector`` (the
    connector tests load it that way into real engines)."""
    probe = (
        "import sys, pd.transfer.connector\n"
        "above = ('pd.connector', 'pd.prefill', 'pd.decode', 'pd.proxy', 'pd.cluster')\n"
        "print(sorted(m for m in sys.modules if m.startswith(above)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[-1] == "[]"
    # The alias defines nothing of its own: the connector's code lives above the roles.
    tree = ast.parse((PD / "transfer" / "connector.py").read_text())
    assert not [n for n in tree.body if isinstance(n, ast.ClassDef)]
