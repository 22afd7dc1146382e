"""Configs that validate must be able to start: KV cache sizes and whether the instances
fit the cluster's resources (engine-free: plans, fit arithmetic, pd-serve --dry-run)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pd.cli.serve import EXIT_CONFIG, EXIT_OK, main
from pd.cluster import kv_size
from pd.cluster.config import ConfigError, load_config
from pd.cluster.placement import check_before_start
from pd.cluster.plan import make_plan
from pd.cluster.resources import Node, fit_problems
from pd.models import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def plan_of(tmp_path: Path, text: str, cores: list[int] | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return make_plan(load_config(path), available_cores=cores or [0, 1])


def dry_run(tmp_path: Path, capsys, text: str) -> tuple[int, str, str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = main(["--config", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --- cpus: auto ---------------------------------------------------------------------------


def test_auto_cpus_are_one_per_instance_when_the_machine_has_them(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}")
    assert [i.num_cpus for i in plan.instances] == [1.0, 1.0]
    assert not plan.warnings


def test_xpyd_on_a_small_machine_shares_its_cpus(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}\nprefill: {instances: 2}")
    assert [i.num_cpus for i in plan.instances] == [0.66, 0.66, 0.66]
    assert sum(i.num_cpus for i in plan.instances) <= 2
    assert any("share cores" in w for w in plan.warnings)  # the core-sharing warning stays
    assert fit_problems(plan.instances, [Node("m", {"CPU": 2.0})]) == []


def test_auto_shares_what_explicit_values_leave(tmp_path):
    plan = plan_of(
        tmp_path,
        "model: {preset: tiny}\nprefill: {resources: {cpus: 1}}\ndecode: {instances: 3}",
    )
    by_role = {i.role: i.num_cpus for i in plan.instances}
    assert by_role == {"prefill": 1.0, "decode": 0.33}


def test_explicit_cpus_leaving_nothing_for_auto_do_not_fit(tmp_path, capsys):
    code, out, err = dry_run(
        tmp_path, capsys, "model: {preset: tiny}\nprefill: {resources: {cpus: 2}}"
    )
    assert code == EXIT_CONFIG
    assert "pd-decode-0    cpus=1 " in out
    assert "does not fit: pd-decode-0 needs CPU 1; the cluster has CPU 2 in total" in err


def test_a_joined_cluster_gets_one_cpu_per_auto_instance(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}\nprefill: {instances: 3}\nray: {address: auto}")
    assert {i.num_cpus for i in plan.instances} == {1.0}


def test_cpus_must_be_positive_or_auto(tmp_path, capsys):
    code, _, err = dry_run(
        tmp_path, capsys, "model: {preset: tiny}\ndecode: {resources: {cpus: 0}}"
    )
    assert code == EXIT_CONFIG and "decode.resources.cpus" in err


# --- fit arithmetic -----------------------------------------------------------------------


def test_fit_names_the_instance_that_does_not_fit_and_what_the_cluster_has(tmp_path):
    plan = plan_of(
        tmp_path,
        "model: {preset: tiny}\nprefill: {instances: 2, resources: {cpus: 1}}\n"
        "decode: {resources: {cpus: 1}}",
    )
    problems = fit_problems(plan.instances, [Node("m", {"CPU": 2.0})])
    assert len(problems) == 1
    assert problems[0].startswith("pd-prefill-1 needs CPU 1; the cluster has CPU 2 in total")
    assert "pd-decode-0, pd-prefill-0 take the rest" in problems[0]


def test_an_instance_larger_than_any_node(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}\nprefill: {resources: {cpus: 16}}")
    problems = fit_problems(plan.instances, [Node("a", {"CPU": 8.0}), Node("b", {"CPU": 8.0})])
    assert problems == [
        "pd-prefill-0 needs CPU 16, more than its largest node (a) has in total (CPU 8)"
    ]


def test_gpu_instances_across_nodes():
    plan = make_plan(load_config(CONFIGS / "gpu-llama-3.1-70b-2p1d-tp4.yaml"))
    eight_gpus = [Node(n, {"CPU": 32.0, "GPU": 8.0}) for n in ("a", "b")]
    assert fit_problems(plan.instances, eight_gpus) == []  # 3 x 4 GPUs on 2 x 8
    four_gpus = [Node(n, {"CPU": 32.0, "GPU": 4.0}) for n in ("a", "b")]
    (problem,) = fit_problems(plan.instances, four_gpus)
    assert "needs CPU 8, GPU 4; the cluster has CPU 64, GPU 8 in total" in problem


# --- pd-serve --dry-run against this machine ----------------------------------------------


def test_dry_run_reports_what_does_not_fit_this_machine(tmp_path, capsys):
    code, out, err = dry_run(
        tmp_path, capsys, "model: {preset: tiny}\ndecode: {resources: {cpus: 100000}}"
    )
    assert code == EXIT_CONFIG
    assert "pd-decode-0" in out  # the plan is still printed
    assert "does not fit: pd-decode-0 needs CPU 100000, more than the machine has" in err


def test_dry_run_reports_missing_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, _, err = dry_run(
        tmp_path, capsys, "model: {preset: tiny}\nprefill: {resources: {gpus: 1}}"
    )
    assert code == EXIT_CONFIG
    assert "pd-prefill-0 needs CPU 1, GPU 1, more than the machine has" in err


def test_dry_run_of_an_unreachable_ray_cluster_says_so(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = dry_run(
        tmp_path, capsys, f"model: {{preset: tiny}}\nray: {{address: '127.0.0.1:{port}'}}"
    )
    assert code == EXIT_CONFIG
    assert f"ray.address: nothing answers at 127.0.0.1:{port}" in err


def test_serving_a_plan_that_cannot_fit_exits_2_before_starting_anything(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\nprefill: {resources: {cpus: 100000}}")
    assert main(["--config", str(path)]) == EXIT_CONFIG  # would start Ray if it got further
    assert "config error: pd-prefill-0 needs CPU 100000" in capsys.readouterr().err


def test_local_config_dry_run_fits(capsys):
    assert main(["--config", str(CONFIGS / "local.yaml"), "--dry-run"]) == EXIT_OK


# --- cpu_kv_cache_gib ---------------------------------------------------------------------


def test_fractional_kv_cache_is_passed_in_bytes(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    plan = plan_of(tmp_path, "model: {preset: tiny}\ndecode: {resources: {cpu_kv_cache_gib: 0.05}}")
    by_role = {i.role: i for i in plan.instances}
    decode, prefill = by_role["decode"], by_role["prefill"]
    # vLLM-cpu reads only whole GiB from the variable; bytes go as a flag.
    args = decode.vllm_args
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(int(0.05 * 2**30))
    assert "VLLM_CPU_KVCACHE_SPACE" not in decode.env  # it would override the flag
    assert prefill.env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # whole GiB: as always
    assert "--kv-cache-memory-bytes" not in prefill.vllm_args


def test_an_inherited_whole_gib_variable_cannot_override_a_fraction(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    code, _, err = dry_run(
        tmp_path, capsys, "model: {preset: tiny}\ndecode: {resources: {cpu_kv_cache_gib: 0.05}}"
    )
    assert code == EXIT_CONFIG
    assert "decode.resources.cpu_kv_cache_gib: 0.05 GiB would be overridden by " in err
    assert "VLLM_CPU_KVCACHE_SPACE=7" in err
    plan = plan_of(tmp_path, "model: {preset: tiny}")  # a whole size: the config's wins
    assert {i.env["VLLM_CPU_KVCACHE_SPACE"] for i in plan.instances} == {"1"}


def test_a_kv_cache_sized_by_the_user_is_left_alone(tmp_path):
    plan = plan_of(
        tmp_path,
        "model: {preset: tiny}\nprefill: {env: {VLLM_CPU_KVCACHE_SPACE: '2'}}\n"
        "decode: {engine_args: {num_gpu_blocks_override: 100}}",
    )
    by_role = {i.role: i for i in plan.instances}
    assert by_role["prefill"].env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "--kv-cache-memory-bytes" not in by_role["prefill"].vllm_args
    assert "--kv-cache-memory-bytes" not in by_role["decode"].vllm_args
    assert "--num-gpu-blocks-override" in by_role["decode"].vllm_args


def test_gpu_instances_get_no_cpu_kv_cache(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}\nprefill: {resources: {gpus: 1}}")
    prefill = next(i for i in plan.instances if i.role == "prefill")
    assert "--kv-cache-memory-bytes" not in prefill.vllm_args
    assert "VLLM_CPU_KVCACHE_SPACE" not in prefill.env


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "decode: {resources: {cpu_kv_cache_gib: 0.001}}",
            "decode.resources.cpu_kv_cache_gib: 0.001 GiB holds 524 tokens; one request of "
            "max_model_len 2048 needs at least",
        ),
        (  # the preset's own length when engine_args do not set one
            "engine_args: {dtype: float32}\nprefill: {resources: {cpu_kv_cache_gib: 0.01}}",
            "prefill.resources.cpu_kv_cache_gib: 0.01 GiB holds 2621 tokens; one request of "
            "max_model_len 4096",
        ),
        ("prefill: {resources: {cpu_kv_cache_gib: 0}}", "prefill.resources.cpu_kv_cache_gib"),
        ("prefill: {resources: {cpu_kv_cache_gib: -1}}", "prefill.resources.cpu_kv_cache_gib"),
        ("decode: {resources: {cpu_kv_cache_gib: lots}}", "decode.resources.cpu_kv_cache_gib"),
        (
            "decode: {resources: {cpu_kv_cache_gib: 1000000}}",
            "KV caches take 1e+06 GiB together, more than this machine's",
        ),
    ],
)
def test_a_kv_cache_that_cannot_work_is_exit_2_naming_the_key(tmp_path, capsys, text, message):
    code, _, err = dry_run(
        tmp_path,
        capsys,
        f"model: {{preset: tiny}}\nengine_args: {{max_model_len: 2048}}\n{text}"
        if "engine_args" not in text
        else f"model: {{preset: tiny}}\n{text}",
    )
    assert code == EXIT_CONFIG
    assert message in err


def test_the_smallest_kv_cache_that_holds_one_request_is_accepted(tmp_path):
    tiny = PRESETS["tiny"]
    # float32 as configs/local.yaml runs it: 4 bytes per value.
    per_token = 2 * tiny.num_layers * tiny.num_kv_heads * tiny.head_dim * 4
    gib = per_token * (2048 + 256) / 2**30
    text = "model: {preset: tiny}\nengine_args: {max_model_len: 2048, dtype: float32}\n"
    plan_of(tmp_path, text + f"decode: {{resources: {{cpu_kv_cache_gib: {gib * 1.001}}}}}")
    with pytest.raises(ConfigError, match=r"decode\.resources\.cpu_kv_cache_gib"):
        plan_of(tmp_path, text + f"decode: {{resources: {{cpu_kv_cache_gib: {gib * 0.99}}}}}")


def test_kv_shape_of_a_model_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,'
        ' "hidden_size": 4096, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}'
    )
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{path: {folder}}}")
    shape = kv_size.kv_shape(load_config(path), {"max_model_len": 8192})
    assert shape == kv_size.KVShape(bytes_per_token=2 * 32 * 8 * 128 * 2, max_model_len=8192)
    (folder / "config.json").write_text('{"num_hidden_layers": 2, "sliding_window": 4096}')
    assert kv_size.kv_shape(load_config(path), {}) is None  # not plain attention: vLLM checks


def test_check_before_start_is_silent_for_a_joined_cluster(tmp_path):
    plan = plan_of(tmp_path, "model: {preset: tiny}\nprefill: {resources: {cpus: 1000}}\n"
                   "ray: {address: auto}")  # fmt: skip
    check_before_start(plan)  # its nodes are checked once connected, by the launcher


def test_help_documents_auto_cpus_and_fractional_kv_caches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "prefill.resources.cpus (default 'auto')" in out
    assert "fractions too (0.05" in out
    assert "check it against the resources of the cluster it would use" in out
