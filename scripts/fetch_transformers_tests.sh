#!/usr/bin/env bash
# Fetch transformers' own common-test mixins (ModelTesterMixin, ConfigTester, ...) for the
# *installed* transformers version. They live in tests/ of the PyPI sdist, not in the wheel.
#
# Result: .cache/transformers_tests/transformers_tests/  (an importable package; the
# directory .cache/transformers_tests is put on sys.path by tests/conftest.py), so tests do
#     from transformers_tests.test_modeling_common import ModelTesterMixin, GenerationTesterMixin
#     from transformers_tests.test_configuration_common import ConfigTester
# The package is renamed from `tests` to `transformers_tests` so it cannot clash with our own tests/.
#
# NOTE: the sdist only ships the top-level tests/*.py. Modules those files import relatively
# but which are NOT in the sdist (generation/test_utils.py, exporters/test_export.py,
# utils/test_configuration_utils.py) are replaced by small shims written below — so
# GenerationTesterMixin and ExportTesterMixin are EMPTY (no generate/export tests run) and
# causal_lm_tester.py (CausalLMModelTester/CausalLMModelTest) is not available.
# Idempotent: does nothing when the cache already matches the installed version.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/transformers_tests"
PKG="$DEST/transformers_tests"

VERSION="$("$PYTHON" -c 'import transformers; print(transformers.__version__)')"

if [[ -f "$PKG/.version" && "$(cat "$PKG/.version")" == "$VERSION" && -f "$PKG/test_modeling_common.py" ]]; then
    echo "transformers $VERSION test mixins already in $PKG"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "Downloading transformers==$VERSION sdist (for its tests/ folder) ..."
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    "transformers==$VERSION" -d "$TMP" \
  || "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "transformers==$VERSION" -d "$TMP"

SDIST="$(ls "$TMP"/transformers-*.tar.gz | head -n1)"
tar -xzf "$SDIST" -C "$TMP" --wildcards "transformers-$VERSION/tests/*"
SRC="$TMP/transformers-$VERSION/tests"
[[ -f "$SRC/test_modeling_common.py" ]] || { echo "ERROR: $SDIST has no tests/test_modeling_common.py" >&2; exit 1; }

rm -rf "$PKG.new"
mkdir -p "$PKG.new"
# Everything the sdist has under tests/ (a few hundred KB); only the *_common / *_mixin files are used.
cp -R "$SRC"/. "$PKG.new"/

"$PYTHON" - "$PKG.new" <<'PY'
"""Make the extracted tests/ an importable package and shim relative imports missing from the sdist."""
import pathlib
import sys

pkg = pathlib.Path(sys.argv[1])
HDR = '"""SHIM written by scripts/fetch_transformers_tests.sh: this module is not in the transformers sdist."""\n'
shims = {
    "__init__.py": '"""transformers tests/ from the PyPI sdist (renamed package; see scripts/fetch_transformers_tests.sh)."""\n',
    "exporters/__init__.py": "",
    "exporters/test_export.py": HDR + "\n\nclass ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": HDR + "\n\nclass GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    # copied from transformers' tests/utils/test_configuration_utils.py (Apache-2.0)
    "utils/test_configuration_utils.py": HDR + """
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
""",
}
for rel, text in shims.items():
    path = pkg / rel
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rel.endswith(".py") and not rel.endswith("__init__.py"):
            print(f"  shim: {rel}")
PY

echo "$VERSION" > "$PKG.new/.version"
rm -rf "$PKG"
mv "$PKG.new" "$PKG"

# Check the import actually works (needs the `parameterized` test dependency).
PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
  'from transformers_tests.test_modeling_common import ModelTesterMixin, GenerationTesterMixin; from transformers_tests.test_configuration_common import ConfigTester'
echo "transformers $VERSION test mixins installed in $PKG"
