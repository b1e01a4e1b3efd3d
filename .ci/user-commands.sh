#!/usr/bin/env bash
# The README's user commands, as a user runs them after `pip install -e .`: in a second, clean
# virtual environment with the runtime dependencies only (no [dev]: pytest brings pygments, which
# once hid that `snakemake --report` needs it), in a throw-away copy of the repository so that no
# result, cache or report leaks into the tests. Its last line says OK or which command failed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/imgclf-user-commands.XXXXXX")
trap 'rm -rf "$work"' EXIT
step="setting up"
trap 'echo "== .ci/user-commands.sh: FAILED at: $step (exit $?)" >&2' ERR
started=$(date +%s)

say() { step=$1; echo "== user command: $1"; }

mkdir "$work/repo"
# The repository as a clone holds it: ignored paths (.venv, results, caches, report.html) stay behind.
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./results --exclude=./resources \
    --exclude=./.snakemake --exclude=./logs --exclude=./report.html --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache -cf - . | tar -C "$work/repo" -xf -

say "python3 -m venv (runtime dependencies only)"
python3 -m venv "$work/venv"  # never --system-site-packages: only what pyproject.toml declares
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1  # the wheels on this machine's disk, as .ci/run
cd "$work/repo"
say "pip install -e ."
python -m pip install -q -e .
if python -c "import pytest" 2>/dev/null; then
  echo "== .ci/user-commands.sh: pytest is installed in the runtime-only environment" >&2; exit 1
fi

say "snakemake --cores all (the quickstart)"
snakemake --cores all
test -s results/tables/quickstart.md
say "snakemake --report report.html"
snakemake --report report.html
test -s report.html
say "snakemake -n results/tables/cifar10.md"
snakemake -n results/tables/cifar10.md
say "imgclf status config/tables/quickstart.yaml"
imgclf status config/tables/quickstart.yaml
say "imgclf table config/tables/quickstart.yaml"
imgclf table config/tables/quickstart.yaml

echo "== .ci/user-commands.sh: OK, the README's user commands ran in a runtime-only environment ($(( $(date +%s) - started )) s)"
