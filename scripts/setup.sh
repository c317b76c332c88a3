#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#
# torch is installed first, pinned to the CPU build that this kind of machine keeps on local
# disk (seconds, no download); a plain `torch` requirement with nothing installed would make
# pip fetch a multi-GB CUDA build. The rest resolves in one pip call so that s3fs, aiobotocore,
# boto3 and botocore agree on versions.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TRAINCTL_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

stamp="$VENV/.trainctl-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0  # already set up for this pyproject.toml
fi

# pip 23's resolver backtracks for minutes over boto3/botocore pairs; a current pip takes seconds.
"${PIP[@]}" install --upgrade "pip>=25"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "==> installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "==> installing trainctl-lightning[dev] (editable)"
"${PIP[@]}" install -e ".[dev]"
echo "$want" > "$stamp"
