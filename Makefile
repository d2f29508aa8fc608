# Quick start:  make demo   |   make test
PYTHON ?= python3
PIP     = $(PYTHON) -m pip
# Always install through constraints.txt (torch==2.13.0 -> local CPU wheel, never CUDA wheels).
PIP_INSTALL = $(PIP) install --disable-pip-version-check -c constraints.txt
# -rfE: the run ends with one line per failure and error (skips are counted, not listed).
PYTEST_FLAGS ?= -q -rfE -p no:cacheprovider

STAMP_DIR = .cache
SETUP_STAMP = $(STAMP_DIR)/setup.stamp

.PHONY: setup demo test check-transformers fetch-transformers-tests corpus clean

# Editable install with train+test extras. Re-runs pip only when packaging files change
# (or when `apex-hf`/apex_hf is not importable any more), so a repeated `make setup` is instant.
setup: $(SETUP_STAMP)
	@$(PYTHON) -c "import apex_hf" 2>/dev/null || { rm -f $(SETUP_STAMP); $(MAKE) --no-print-directory $(SETUP_STAMP); }

$(SETUP_STAMP): setup.cfg pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[train,test]"
	@mkdir -p $(STAMP_DIR) && touch $@

demo: setup
	apex-hf demo

fetch-transformers-tests: setup
	PYTHON=$(PYTHON) bash scripts/fetch_transformers_tests.sh

test: setup fetch-transformers-tests
	@# pytest exit code 5 = "no tests collected": not an error; any other nonzero code fails.
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest $(PYTEST_FLAGS) tests; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# A saved checkpoint as Hub remote code under the oldest and newest transformers that setup.cfg allows, each in a
# throwaway environment (downloads those transformers wheels once into .cache/).
check-transformers: setup
	$(PYTHON) scripts/check_transformers_versions.py

corpus:
	$(PYTHON) scripts/make_corpus.py

clean:
	rm -rf build dist *.egg-info src/*.egg-info .cache .pytest_cache
