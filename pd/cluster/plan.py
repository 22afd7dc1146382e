"""From a validated ClusterConfig to a concrete plan: which instances, where, how.

The plan is what ``pd-serve --dry-run`` prints and what the launcher executes, so
both always agree.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pd.cluster import kv_events, kv_size
from pd.cluster.config import ClusterConfig, ConfigError, RoleSpec
from pd.models import model_dir

KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


@dataclass(frozen=True)
class InstancePlan:
    name: str  # the Ray actor's name, e.g. pd-prefill-0
    role: str  # "prefill" or "decode"
    index: int
    model: str  # a local folder or hub id; generated presets resolve to their folder
    model_preset: str | None  # generated on the instance's host before vLLM starts
    host: str | None  # address vLLM and the transfer side channel bind; None: the node's IP
    vllm_args: list[str]
    env: dict[str, str]
    num_cpus: float
    num_gpus: int
    cpu_cores: str | None
    niceness: int = 0  # the vLLM server's CPU priority
    # routing: kv_aware: the (publisher, replay) KV event endpoints vLLM binds.
    kv_events: tuple[str, str] | None = None
    # A joined cluster: custom Ray resources the actor takes, node labels it needs
    # (describe() prints them after the niceness).
    ray_resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterPlan:
    config: ClusterConfig
    instances: list[InstancePlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def by_role(self, role: str) -> list[InstancePlan]:
        return [i for i in self.instances if i.role == role]

    def describe(self) -> str:
        c = self.config
        lines = [
            f"model: {self.instances[0].model} (served as {c.served_model_name!r})",
            f"proxy: http://{c.proxy.host}:{c.proxy.port}  routing={c.proxy.routing}  "
            f"transport={c.transport}",
            "ray: "
            + (f"join {c.ray.address}" if c.ray.address else "start a local cluster")
            + f", namespace {c.ray.namespace!r}, dashboard "
            f"http://{c.ray.dashboard_host}:{c.ray.dashboard_port}",
            "instances:",
        ]
        for inst in self.instances:
            cores = f" cores={inst.cpu_cores}" if inst.cpu_cores else ""
            nice = f" nice={inst.niceness}" if inst.niceness else ""
            nice += "".join(f" {k}={v:g}" for k, v in inst.ray_resources.items())
            nice += "".join(f" label:{k}={v}" for k, v in inst.node_labels.items())
            lines.append(
                f"  {inst.name:<14} cpus={inst.num_cpus:g} gpus={inst.num_gpus}{cores}{nice} "
                f"port=auto\n    vllm serve {shlex.join([inst.model, *inst.vllm_args])}"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def engine_args_to_cli(args: dict[str, Any]) -> list[str]:
    """``{"max_model_len": 2048, "enforce_eager": True}`` -> ``--max-model-len 2048 ...``."""
    cli: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cli.append(flag)
        elif value is False:
            cli.append("--no-" + key.replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, dict | list):
            cli += [flag, json.dumps(value)]
        else:
            cli += [flag, str(value)]
    return cli


def make_plan(config: ClusterConfig, available_cores: list[int] | None = None) -> ClusterPlan:
    """``available_cores``: the cores of the machine a local cluster runs on (default:
    this process's); their count is also the CPUs ``cpus: auto`` shares."""
    cores = sorted(available_cores if available_cores is not None else os.sched_getaffinity(0))
    warnings: list[str] = []
    model = str(model_dir(config.model.preset)) if config.model.preset else str(config.model.path)
    _check_local_model_path(config)
    cpus = _cpus_per_instance(config, len(cores))
    next_core = 0
    instances: list[InstancePlan] = []
    events_token = kv_events.new_run_token()  # names this start's ipc sockets
    for role, spec in (("prefill", config.prefill), ("decode", config.decode)):
        kv_size.check(config, role, spec, {**config.engine_args, **spec.engine_args})
        for index in range(spec.instances):
            cpu_cores, next_core = _cores_for(spec, cpus[role], cores, next_core, warnings)
            # A local cluster stays on loopback; a joined one uses each node's IP.
            host = "127.0.0.1" if config.ray.address is None else None
            name = f"pd-{role}-{index}"
            events = None
            if config.proxy.routing == "kv_aware":
                port_base = config.proxy.kv_aware.events_port
                ordinal = len(instances)
                events = kv_events.endpoints(host is not None, name, ordinal, port_base,
                                             events_token)  # fmt: skip
            instances.append(
                InstancePlan(
                    name=name,
                    role=role,
                    index=index,
                    model=model,
                    model_preset=config.model.preset,
                    host=host,
                    vllm_args=_vllm_args(config, role, spec)
                    + (kv_events.vllm_args(*events) if events else []),
                    env=_env(config, spec, cpu_cores, loopback=host is not None),
                    num_cpus=cpus[role],
                    num_gpus=spec.resources.gpus,
                    cpu_cores=cpu_cores,
                    niceness=spec.resources.niceness,
                    kv_events=events,
                    ray_resources=dict(spec.placement.resources),
                    node_labels=dict(spec.placement.labels),
                )
            )
    if not _is_loopback(config.proxy.host) and config.proxy.resolved_api_key() is None:
        warnings.append(
            f"proxy.host {config.proxy.host} is reachable from other machines and no API key "
            "is set (proxy.api_key_env): anyone who reaches it can use the model"
        )
    return ClusterPlan(config=config, instances=instances, warnings=warnings)


def _cpus_per_instance(config: ClusterConfig, machine_cpus: int) -> dict[str, float]:
    """Each role's Ray CPUs per instance. ``auto`` is 1; on a local cluster where that
    does not fit the machine, the ``auto`` instances share the CPUs left equally."""
    roles = {"prefill": config.prefill, "decode": config.decode}
    explicit = {r: s.resources.cpus for r, s in roles.items() if s.resources.cpus != "auto"}
    cpus: dict[str, float] = {r: float(v) for r, v in explicit.items()}
    auto = [r for r in roles if r not in explicit]
    auto_instances = sum(roles[r].instances for r in auto)
    left = machine_cpus - sum(cpus[r] * roles[r].instances for r in explicit)
    # Two decimals, rounded down, so the shares never add up to more than the machine.
    share = math.floor(left / auto_instances * 100) / 100 if auto_instances else 1.0
    if config.ray.address is not None or share >= 1 or share < 0.01:
        share = 1.0  # enough, or nothing left: the fit check names what takes it all
    return cpus | {r: share for r in auto}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume it resolves beyond this machine


def _check_local_model_path(config: ClusterConfig) -> None:
    """A filesystem-looking model.path must exist when every instance runs on this host."""
    path = config.model.path
    if path is None or config.ray.address is not None:
        return
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path: no such folder {path!r} (nor a model hub id)")


def _vllm_args(config: ClusterConfig, role: str, spec: RoleSpec) -> list[str]:
    args = {**config.engine_args, **spec.engine_args}
    gpus = spec.resources.gpus
    if gpus > 1:
        tp = args.setdefault("tensor_parallel_size", gpus)
        if int(tp) != gpus:
            raise ConfigError(
                f"{role}.engine_args.tensor_parallel_size: {tp} differs from "
                f"{role}.resources.gpus: {gpus} (each instance uses its GPUs for TP)"
            )
    kv_config = {
        "kv_connector": "PDConnector",
        "kv_connector_module_path": "pd.transfer.connector",
        "kv_role": KV_ROLE[role],
        "kv_connector_extra_config": {
            "transport": config.transport,
            **config.connector.model_dump(),
            **({"store": config.store} if config.store is not None else {}),
        },
    }
    return [
        "--served-model-name",
        config.served_model_name,
        *engine_args_to_cli(args),
        *kv_size.sizing(spec, args)[0],
        "--kv-transfer-config",
        json.dumps(kv_config),
    ]


def _env(
    config: ClusterConfig, spec: RoleSpec, cpu_cores: str | None, loopback: bool
) -> dict[str, str]:
    env = dict(spec.env)
    if config.store is not None:
        env["PD_STORE_MANAGED"] = "1"  # the node's store actor runs it, outside the instance
    if spec.resources.gpus == 0:
        env.update(kv_size.sizing(spec, {**config.engine_args, **spec.engine_args})[1])
        if cpu_cores:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_cores)
        # NIXL's UCX listens on every network interface unless told otherwise; all of a
        # local cluster's peers are on this host. (GPU instances keep UCX's choice: it
        # picks their intra-node paths.)
        if loopback and "UCX_NET_DEVICES" not in os.environ:
            env.setdefault("UCX_NET_DEVICES", "lo")
    return env


def _cores_for(
    spec: RoleSpec, cpus: float, cores: list[int], next_core: int, warnings: list[str]
) -> tuple[str | None, int]:
    wanted = spec.resources.cpu_cores
    if spec.resources.gpus > 0 or wanted is None:
        return None, next_core
    if wanted != "auto":
        return wanted, next_core
    count = max(1, math.ceil(cpus))
    if next_core + count > len(cores):
        warnings.append(
            f"not enough cores for one set per instance ({len(cores)} available): "
            "instances share cores"
        )
        next_core = 0
    chosen = cores[next_core : next_core + count]
    return _core_list(chosen), next_core + count


def _core_list(cores: list[int]) -> str:
    if cores == list(range(cores[0], cores[-1] + 1)) and len(cores) > 1:
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(str(c) for c in cores)
