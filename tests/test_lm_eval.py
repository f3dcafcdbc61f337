"""lm-evaluation-harness scores the real server (its local-completions model: echo + logprobs over HTTP on
loopback) exactly as it scores the same checkpoint in process (its hf model), on local tasks: a rolling
perplexity and a multiple choice. The checkpoints are stories260K made to predict EOS right after EOS_PROMPT,
and SmolLM2-135M-Instruct, whose next token after a finished chat answer is EOS, so that both tasks hold a
request whose next token is EOS.

lm-eval runs in subprocesses from its own folder (`make setup` installs it into .venv/lmeval), so that its
dependencies (datasets, pandas, pyarrow...) never reach the project's imports."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from conftest import TEXT
from sparse_runtime.models.sources import load_model, resolve
from test_engine import EOS_PROMPT, eos_model  # noqa: F401  (fixture: stories260K predicting EOS after EOS_PROMPT)
from test_server import serve

LMEVAL = Path(os.environ.get("SPARSE_RUNTIME_LMEVAL", Path(sys.prefix) / "lmeval"))
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow,
              pytest.mark.skipif(not (LMEVAL / "lm_eval").is_dir(),
                                 reason=f"lm-eval is not installed in {LMEVAL} (`make setup` puts it there)")]

# Both models score the same rolling windows (several per story): hf predicts max_length tokens per window,
# local-completions max_length - 2 (it keeps one for the token it asks the server to generate, one for context).
WINDOW = 96


# SmolLM2-135M-Instruct answers this and stops: its next token is EOS (<|im_end|>); the case lm-eval users hit
SMOL_EOS_PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?"


@pytest.fixture(params=["stories260k", "smollm2"])
def case(request, tmp_path):
    """(model, tokenizer, its folder, a prompt after which its next token is EOS, whether its tokenizer adds BOS)."""
    if request.param == "stories260k":
        model, tok, _, _ = request.getfixturevalue("eos_model")
        ckpt = tmp_path / "ckpt"
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        return model, tok, ckpt, EOS_PROMPT, True
    folder = resolve("smollm2-135m")
    model, tok = load_model(folder)
    with torch.no_grad():
        nxt = int(model(torch.tensor([tok(SMOL_EOS_PROMPT).input_ids])).logits[0, -1].argmax())
    assert nxt == tok.eos_token_id
    return model, tok, folder, SMOL_EOS_PROMPT, False


def write_tasks(folder: Path, eos_prompt: str) -> list[str]:
    """Two local tasks (jsonl data, YAML configs) made from the first TinyStories validation stories."""
    stories = (TEXT / "tinystories_valid_head.txt").read_text().splitlines()
    docs = [{"text": s} for s in stories[:2]] + [{"text": eos_prompt}]
    # Multiple choice: a sentence's first words, its next word among the other sentences' next words
    cut = [s.split()[:9] for s in stories[2:6]]
    items = [{"context": " ".join(w[:-1]), "choices": [c[-1] for c in cut], "gold": i} for i, w in enumerate(cut)]
    head = eos_prompt.split()
    items.append({"context": " ".join(head[:-1]), "choices": ["big", head[-1], "dog"], "gold": 1})
    tasks = {"sr_ppl": (docs, {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                               "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                                       "bits_per_byte")]}),
             "sr_choice": (items, {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                                   "doc_to_choice": "{{choices}}", "doc_to_target": "gold",
                                   "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})}
    for name, (rows, config) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # A local json dataset (its one split is "train"); JSON is YAML
        (folder / f"{name}.yaml").write_text(json.dumps(
            {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": str(data)}, "test_split": "train",
             "metadata": {"version": 1}, **config}, indent=1))
    return list(tasks)


@contextlib.contextmanager
def lm_eval(tmp: Path, tasks: list[str], model: str, model_args: str):
    """lm-eval's command line running on the tasks (killed on the way out); it writes its log to tmp/model.log and
    every request's result under tmp/model."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(LMEVAL), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "datasets"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(tasks), "--include_path", str(tmp), "--batch_size", "1", "--log_samples",
           "--output_path", str(tmp / model)]
    with open(tmp / f"{model}.log", "w") as log:
        run = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield run
    finally:
        run.kill()
        run.wait()


def flat(x) -> list:
    return [y for e in x for y in flat(e)] if isinstance(x, list) else [x]


def results(run: subprocess.Popen, out: Path, tasks: list[str]) -> tuple[dict, dict]:
    """Wait for an lm-eval run: its metrics per task, and per task its requests' results (log-likelihoods and
    greediness), in document order."""
    assert run.wait(timeout=300) == 0, (out.parent / f"{out.name}.log").read_text()[-4000:]
    (res,) = out.rglob("results_*.json")
    samples = {}
    for t in tasks:
        (f,) = out.rglob(f"samples_{t}_*.jsonl")
        rows = sorted(map(json.loads, f.read_text().splitlines()), key=lambda s: s["doc_id"])
        samples[t] = [v if v in ("True", "False") else float(v) for v in flat([s["resps"] for s in rows])]
    return json.loads(res.read_text())["results"], samples


def test_local_completions_scores_as_hf(case, tmp_path):
    """The same metrics, and the same log-likelihood and greediness for every request (relative 1e-5)."""
    model, tok, ckpt, eos_prompt, bos = case
    tasks = write_tasks(tmp_path, eos_prompt)
    # Both add BOS where the tokenizer does, as the server does to a text prompt. local-completions sends token ids
    # (its default; as text they would be re-tokenized with a BOS added, shifting the positions it scores). hf runs
    # beside the server.
    hf_args = f"pretrained={ckpt},dtype=float32,add_bos_token={bos},max_length={WINDOW}"
    with lm_eval(tmp_path, tasks, "hf", hf_args) as hf_run, serve((model, tok)) as url:
        api_args = f"model=stories260K,base_url={url}/v1/completions,tokenizer={ckpt},tokenizer_backend=huggingface," \
                   f"add_bos_token={bos},max_length={WINDOW + 2},num_concurrent=4"
        with lm_eval(tmp_path, tasks, "local-completions", api_args) as api_run:
            served = results(api_run, tmp_path / "local-completions", tasks)
        hf = results(hf_run, tmp_path / "hf", tasks)
    for task in tasks:
        ref, got = hf[0][task], served[0][task]
        metrics = [k for k, v in ref.items() if isinstance(v, float) and "stderr" not in k]
        assert metrics and ref.keys() == got.keys()
        assert {k: got[k] for k in metrics} == {k: pytest.approx(ref[k], rel=1e-5) for k in metrics}, task
        ref, got = hf[1][task], served[1][task]  # log-likelihoods, and for multiple choice "True"/"False" too
        assert len(ref) > 0 and got == [pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for v in ref], task
