#!/usr/bin/env bash
# Developer set-up; a no-op when nothing changed.
#   bash tools/setup.sh          ./.venv: pinned torch/torchvision, NATTEN, timm-nat (editable), its test and framework extras
#   bash tools/setup.sh --floor  ./.venv-floor: the lowest torch / timm that pyproject.toml allows, no NATTEN
#                                (what CI's `floor` tests run on)
#
# Why these steps: timm needs torchvision, and the registry's torchvision wheels only import with
# their matching torch, so both are installed first as one pinned pair (the CUDA builds run on CPU
# too). NATTEN is an sdist whose build declares and imports torch (on CUDA it compiles against it;
# without CUDA nothing is compiled): built in isolation it would fetch a second torch of several GB
# and, on CUDA, build against that one, so it is installed without build isolation, against the
# torch already in the venv. Users need none of this: `pip install .` (NATTEN is the optional
# extra `timm-nat[natten]`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ "${1:-}" = "--floor" ]; then
    VENV=.venv-floor
    TORCH="torch==2.11.0 torchvision==0.26.0"
    TIMM="timm==1.0.21"
    NATTEN=""
    EXTRAS="test"
else
    VENV=.venv
    TORCH="torch==2.15.0 torchvision==0.29.2"
    TIMM=""
    NATTEN="natten==0.21.7"
    EXTRAS="test,frameworks"
fi

stamp=$VENV/.timm-nat-setup
want="$(cat pyproject.toml tools/setup.sh | sha1sum) $*"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
pip() {  # quiet pip that keeps its exit status (and drops this machine's find-links noise)
    local status=0 log; log="$(mktemp)"
    $VENV/bin/python -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
    return "$status"
}
echo "setup: installing $TORCH $TIMM $NATTEN and timm-nat into $VENV (several GB on first run)"
pip install $TORCH $TIMM
[ -z "$NATTEN" ] || pip install --no-build-isolation $NATTEN
pip install -e ".[$EXTRAS]" $TORCH $TIMM  # the pins again, so that resolving timm-nat keeps them
$VENV/bin/python -c "import torch, torchvision, timm, timm_nat" \
    || { echo "setup: $VENV is incomplete (see pip output above)" >&2; exit 1; }
[ -z "$NATTEN" ] || $VENV/bin/python -c "import natten" \
    || { echo "setup: natten did not install into $VENV" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
