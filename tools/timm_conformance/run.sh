#!/usr/bin/env bash
# Runs timm's own model tests (tests/test_models.py from the sdist of the installed timm) on the hat_net
# models, the same tests timm runs for pvt_v2. Extra arguments go to pytest, e.g. `-k "hat_net_tiny"`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=$(command -v "${PYTHON:-python}")
# an absolute path: the tests run from another folder (a venv's python must keep its own path, not its target)
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
version=$("$python" -c 'import timm; print(timm.__version__)')
work=${TIMM_TESTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hatnet/timm-tests-$version}
if [ ! -f "$work/test_models.py" ]; then
  mkdir -p "$work/sdist"
  "$python" -m pip download --quiet --no-deps --no-binary :all: "timm==$version" -d "$work/sdist"
  tar -xzf "$work/sdist/timm-$version.tar.gz" -C "$work/sdist" "timm-$version/tests/test_models.py"
  cp "$work/sdist/timm-$version/tests/test_models.py" "$work/test_models.py"
fi
cp "$here/conftest.py" "$work/conftest.py"
cd "$work"
exec "$python" -m pytest test_models.py --rootdir "$work" -p no:cacheprovider -k hat_net "$@"
