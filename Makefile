# The two commands of the README: `make demo` (main job on the default model) and `make test`.
PY ?= python3
# torch is pinned for the CPU wheel these machines carry; an unpinned torch pulls the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test families
install:
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[test,onnx,genai,compressed,report]"

demo: install
	$(PY) -m lowbit.tools.cli demo

test: install
	$(PY) -m pytest -q -n auto -m "not slow and not gpu and not tensorrt"

# docs/families.md: the family x capability matrix, from what tests/test_families.py measures
families: install
	rm -f .families.jsonl
	LOWBIT_FAMILIES_OUT=.families.jsonl $(PY) -m pytest -q -n auto tests/test_families.py -k "not docs_matrix"
	$(PY) tests/test_families.py .families.jsonl > docs/families.md
	rm -f .families.jsonl
