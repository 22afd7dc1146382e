"""cluster.yaml validation, the plan, and pd-serve's config errors (no engines started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pd.cli.serve import EXIT_CONFIG, main
from pd.cluster.config import load_config
from pd.cluster.plan import engine_args_to_cli, make_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BAD_CONFIGS = [
    ("model: [", "not valid YAML"),
    ("- a\n- b", "expected a mapping"),
    ("engine_args: {}", "model: Field required"),
    ("model: {preset: tiny, path: /x}", "exactly one of model.preset or model.path"),
    ("model: {preset: huge}", "model.preset must be one of"),
    ("model: {path: /nonexistent/model}", "model.path: no such folder"),
    ("model: {preset: tiny}\nprefil: {instances: 1}", "prefil: unknown key"),
    ("model: {preset: tiny}\nprefill: {instances: 0}", "prefill.instances"),
    ("model: {preset: tiny}\ndecode: {instances: two}", "decode.instances"),
    ("model: {preset: tiny}\ntransport: rdma", "transport"),
    ("model: {preset: tiny}\nproxy: {port: 70000}", "proxy.port"),
    ("model: {preset: tiny}\nproxy: {routing: random}", "proxy.routing"),
    ("model: {preset: tiny}\nproxy: {max_n: 0}", "proxy.max_n"),
    ("model: {preset: tiny}\nproxy: {max_body_bytes: 10}", "proxy.max_body_bytes"),
    ("model: {preset: tiny}\nproxy: {api_key: ''}", "proxy.api_key"),
    ("model: {preset: tiny}\nproxy: {api_key: k, api_key_env: HOME}", "at most one of"),
    (
        "model: {preset: tiny}\nproxy: {api_key_env: PD_TEST_NO_SUCH_VAR}",
        "proxy.api_key_env: environment variable PD_TEST_NO_SUCH_VAR is not set",
    ),
    ("model: {preset: tiny}\nengine_args: {port: 9}", "set by pd itself"),
    ("model: {preset: tiny}\ndecode: {engine_args: {kv-transfer-config: x}}", "set by pd itself"),
    ("model: {preset: tiny}\nconnector: {lease_timeout_s: -1}", "connector.lease_timeout_s"),
    ("model: {preset: tiny}\ntimeouts: {startup_s: 0}", "timeouts.startup_s"),
    ("model: {preset: tiny}\ntimeouts: {health_misses: 0}", "timeouts.health_misses"),
    ("model: {preset: tiny}\nprefill: {resources: {gpus: -1}}", "prefill.resources.gpus"),
    ("model: {preset: tiny}\ndecode: {resources: {niceness: 20}}", "decode.resources.niceness"),
    (
        "model: {preset: tiny}\nprefill: {resources: {gpus: 2}, "
        "engine_args: {tensor_parallel_size: 4}}",
        "tensor_parallel_size: 4 differs from prefill.resources.gpus: 2",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_is_one_clear_message_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert main(["--config", str(path), "--dry-run"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("pd-serve: config error: ")
    assert message in err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == EXIT_CONFIG
    assert "no such file" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model: {preset: tiny}\nproxy: {port: -5}")
    result = subprocess.run(
        [Path(sys.executable).with_name("pd-serve"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "proxy.port" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_dry_run(config, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert "pd-prefill-0" in out and "pd-decode-0" in out
    assert "PDConnector" in out
    if config.name == "local.yaml":
        assert code == 0, err
    else:  # GPU configs, checked against a cluster (or machine) this CPU host is not
        assert code == EXIT_CONFIG
        assert "does not fit" in err or "cannot reach the Ray cluster" in err


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("model.preset", "prefill.resources.gpus", "proxy.routing", "ray.address",
                "timeouts.drain_s", "connector.lease_timeout_s", "transport",
                "proxy.max_body_bytes", "proxy.max_n", "proxy.api_key_env"):  # fmt: skip
        assert key in out


def test_local_plan_gives_each_instance_its_own_core(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    plan = make_plan(load_config(CONFIGS / "local.yaml"), available_cores=[0, 1])
    by_name = {i.name: i for i in plan.instances}
    assert by_name["pd-prefill-0"].env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert by_name["pd-decode-0"].env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    for inst in plan.instances:  # everything on loopback, NIXL's UCX listeners included
        assert inst.host == "127.0.0.1"
        assert inst.env["UCX_NET_DEVICES"] == "lo"
    assert not plan.warnings
    assert "kv_producer" in " ".join(by_name["pd-prefill-0"].vllm_args)
    assert "kv_consumer" in " ".join(by_name["pd-decode-0"].vllm_args)


def test_niceness_per_role(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nprefill: {resources: {niceness: 5}}")
    plan = make_plan(load_config(path), available_cores=[0, 1])
    by_name = {i.name: i for i in plan.instances}
    assert by_name["pd-prefill-0"].niceness == 5
    assert by_name["pd-decode-0"].niceness == 0  # normal priority unless asked
    assert "nice=5" in plan.describe()


def test_plan_warns_when_cores_are_shared(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nprefill: {instances: 2}\ndecode: {instances: 2}")
    plan = make_plan(load_config(path), available_cores=[0, 1])
    assert plan.warnings and "share cores" in plan.warnings[0]


def test_gpu_plan_sets_tensor_parallel_and_gpus():
    plan = make_plan(load_config(CONFIGS / "gpu-llama-3.1-70b-2p1d-tp4.yaml"))
    assert [i.name for i in plan.instances] == ["pd-prefill-0", "pd-prefill-1", "pd-decode-0"]
    for inst in plan.instances:
        assert inst.num_gpus == 4
        assert inst.cpu_cores is None and "VLLM_CPU_OMP_THREADS_BIND" not in inst.env
        args = inst.vllm_args
        assert args[args.index("--tensor-parallel-size") + 1] == "4"
        assert inst.host is None  # a joined cluster binds each node's own address


def test_engine_args_to_cli():
    cli = engine_args_to_cli(
        {
            "max_model_len": 2048,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "seed": None,
            "override_generation_config": {"temperature": 0},
        }
    )
    assert cli == [
        "--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching",
        "--override-generation-config", '{"temperature": 0}',
    ]  # fmt: skip


def test_api_key_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nproxy: {api_key_env: PD_TEST_KEY}")
    monkeypatch.setenv("PD_TEST_KEY", "from-env")
    proxy = load_config(path).proxy
    assert proxy.resolved_api_key() == "from-env"
    assert "from-env" not in repr(proxy)
    path.write_text("model: {preset: tiny}\nproxy: {api_key: in-file}")
    assert load_config(path).proxy.resolved_api_key() == "in-file"
    assert "in-file" not in repr(load_config(path))
    path.write_text("model: {preset: tiny}")
    assert load_config(path).proxy.resolved_api_key() is None


def test_plan_warns_about_an_open_proxy_without_key(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nproxy: {host: 0.0.0.0}")
    plan = make_plan(load_config(path), available_cores=[0, 1])
    assert any("no API key" in w for w in plan.warnings)
    monkeypatch.setenv("PD_TEST_KEY", "k")
    path.write_text("model: {preset: tiny}\nproxy: {host: 0.0.0.0, api_key_env: PD_TEST_KEY}")
    assert not make_plan(load_config(path), available_cores=[0, 1]).warnings
    plan = make_plan(load_config(CONFIGS / "local.yaml"), available_cores=[0, 1])
    assert not plan.warnings  # loopback


def test_proxy_limits_reach_the_proxy(tmp_path):
    from pd.cli.runner import _decode_max_model_len

    plan = make_plan(load_config(CONFIGS / "local.yaml"), available_cores=[0, 1])
    assert _decode_max_model_len(plan) == 2048
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {preset: tiny}\nengine_args: {max_model_len: 4096}\n"
        "decode: {engine_args: {max-model-len: '1024'}}"
    )
    assert _decode_max_model_len(make_plan(load_config(path), available_cores=[0, 1])) == 1024
    path.write_text("model: {preset: tiny}\nengine_args: {max_model_len: 4k}")
    assert _decode_max_model_len(make_plan(load_config(path), available_cores=[0, 1])) is None


def test_with_a_store_the_instances_leave_starting_it_to_pd_serve(tmp_path):
    """pd-serve's store actor runs the node's store: an instance must never start one
    (it would be under the instance's guardian and die with it)."""
    plain = make_plan(load_config(CONFIGS / "local.yaml"), available_cores=[0, 1])
    stored = make_plan(
        load_config(CONFIGS / "local.yaml", {"store": {"disk_path": str(tmp_path)}}),
        available_cores=[0, 1],
    )
    assert all("PD_STORE_MANAGED" not in inst.env for inst in plain.instances)
    assert all(inst.env["PD_STORE_MANAGED"] == "1" for inst in stored.instances)
