#!/usr/bin/env bash
# Refresh requirements-lock.txt: install the project (extras test and ray) into a FRESH virtual
# environment, exactly as the README does but without the lock, and freeze what pip resolved.
#
#     bash scripts/refresh_lock.sh            # then review `git diff requirements-lock.txt`
#
# --all: setuptools is a runtime requirement (of torch); pip itself is left out.
# torch is pinned by its public version (2.13.0, not 2.13.0+cpu), so the same lock serves the CPU
# wheel installed here and a CUDA build of the same release on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-torch==2.13.0}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install --quiet "$TORCH"
"$py" -m pip install --quiet -e ".[test,ray]"
{
  echo "# Exact versions of every package of \`pip install -e \".[test,ray]\"\` (after $TORCH),"
  echo "# resolved in a fresh venv by \`bash scripts/refresh_lock.sh\` (Python $("$py" -c 'import platform; print(platform.python_version())'), $(uname -s) $(uname -m))."
  echo "# Install: python -m pip install $TORCH && python -m pip install -r requirements-lock.txt && python -m pip install -e \".[test,ray]\" --no-deps"
  "$py" -m pip freeze --all --exclude-editable | grep -v "^pip==" | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements-lock.txt.new
mv requirements-lock.txt.new requirements-lock.txt
echo "requirements-lock.txt: $(grep -vc '^#' requirements-lock.txt) packages"
