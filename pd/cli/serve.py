"""pd-serve: start a prefill/decode cluster on Ray behind an OpenAI-compatible proxy.

    pd-serve --config configs/local.yaml [--dry-run] [--port 8000]

The proxy runs in this process (not as a Ray actor): it is on every request's path,
holds no state worth replicating, and living next to the launcher lets one
Ctrl-C drain requests, stop every instance and stop Ray in order. Exit codes: 0 after
a clean shutdown, 1 when the cluster could not start (the proxy's port taken
included), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import textwrap
from pathlib import Path

from pd.cluster.config import ClusterConfig, ConfigError, load_config
from pd.cluster.placement import check_before_start, dry_run_problems
from pd.cluster.plan import make_plan

EXIT_OK, EXIT_STARTUP, EXIT_CONFIG = 0, 1, 2


def config_reference() -> str:
    """Every cluster.yaml key with its default and meaning, from the schema itself."""
    lines = []

    def walk(model, prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, key + ".")
                continue
            default = (
                "required"
                if field.is_required()
                else f"default {field.get_default(call_default_factory=True)!r}"
            )
            doc = _field_doc(model, name)
            lines.append(f"  {key}  ({default})" + (f"\n      {doc}" if doc else ""))

    walk(ClusterConfig, "")
    return "\n".join(lines)


def _field_doc(model, name: str) -> str:
    import ast
    import inspect

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    except (OSError, TypeError):
        return ""
    if not isinstance(cls := tree.body[0], ast.ClassDef):
        return ""
    for node, following in itertools.pairwise(cls.body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            return " ".join(str(following.value.value).split())
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pd-serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a disaggregated prefill/decode cluster (vLLM instances as Ray "
        "actors) behind an OpenAI-compatible proxy.",
        epilog="cluster.yaml keys (see configs/ for examples):\n" + config_reference(),
    )
    parser.add_argument("--config", required=True, type=Path, help="cluster.yaml to serve")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved plan, check it against the resources of the cluster it "
        "would use (ray.address's, else this machine's) and exit: 2 if it does not fit",
    )
    parser.add_argument("--host", help="override proxy.host")
    parser.add_argument("--port", type=int, help="override proxy.port")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {}
    if args.host:
        overrides["proxy.host"] = args.host
    if args.port is not None:
        overrides["proxy.port"] = args.port
    try:
        config = load_config(args.config, overrides)
        plan = make_plan(config)
        if args.dry_run:
            print(plan.describe())
            # The resources of the cluster it would use: a joined one's, or this machine's.
            problems = dry_run_problems(plan)
            for problem in problems:
                print(f"pd-serve: does not fit: {problem}", file=sys.stderr)
            return EXIT_CONFIG if problems else EXIT_OK
        check_before_start(plan)
    except ConfigError as e:
        print(f"pd-serve: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from pd.cli.runner import run_cluster

    return run_cluster(plan)


if __name__ == "__main__":
    sys.exit(main())
