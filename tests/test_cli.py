import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_runtime.cli import COMMANDS, main


def _run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "sparse_runtime", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == "available"
    assert info["versions"]["torch"]
    assert info["capabilities"]["mmasp"] == {"dtypes": "float16, bfloat16", "patterns": "2:4", "quant": "none",
                                             "devices": "cuda", "auto": "none", "max_m": "16"}
    assert info["capabilities"]["reference"]["dtypes"] == "-"
    assert info["capabilities"]["reference"]["quant"] == "int8, int4, fp8"


def test_info_text_prints_the_capability_tables(capsys):
    from sparse_runtime import backends

    main(["info"])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("what each backend takes"))
    header = lines[start + 1].split()
    assert header == ["backend", "dtypes", "patterns", "quant", "devices", "auto", "max_m"]
    rows = {line.split()[0]: line for line in lines[start + 2:start + 2 + len(backends.names())]}
    assert set(rows) == set(backends.names())
    assert rows["mmasp"].split()[-1] == "16" and "float16, bfloat16" in rows["mmasp"]


def test_info_text_lists_unavailable_reasons(capsys):
    import torch

    from sparse_runtime import backends

    main(["info"])
    out = capsys.readouterr().out
    assert "device:" in out
    why = backends.availability("cuda" if torch.cuda.is_available() else "cpu")
    assert len(why) >= 5 and why["reference"] is None
    for name, reason in why.items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split(None, 1)[1] == ("available" if reason is None else f"unavailable: {reason}")


def test_every_command_the_readme_lists_exists_and_prints_its_help(capsys):
    """The README's command table and the CLI agree, and each command's module imports and builds its options."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = {line.split("`")[1].split()[0] for line in readme.splitlines() if line.startswith("| `")}
    assert documented == set(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: sparse-runtime {cmd}")


def test_generate_streams_from_folder_and_checkpoint(stories_dir, tmp_path):
    p = _run("generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "10",
             "--no-chat")
    assert p.stdout.startswith(", there was a little girl named Lily")
    assert "tok/s" in p.stderr
    from sparse_runtime import save_pretrained, sparsify
    from sparse_runtime.models.sources import load_model

    model, tok = load_model(stories_dir)
    sparsify(model)
    save_pretrained(model, tmp_path / "ck", tokenizer=tok)
    from sparse_runtime.serving.generate import stream_generate

    want = "".join(t.text for t in stream_generate(model, tok, "Once upon a time", max_new_tokens=5))
    p = _run("generate", "--model", str(tmp_path / "ck"), "--prompt", "Once upon a time", "--max-new-tokens", "5",
             "--no-chat")
    assert want and p.stdout == want + "\n"


def test_generate_bad_model_is_clear_error():
    p = _run("generate", "--model", "/nonexistent/model", check=False)
    assert p.returncode != 0 and "not a folder" in p.stderr


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--max-new-tokens", "0"]])
def test_generate_bad_arguments(stories_dir, args):
    p = _run("generate", "--model", str(stories_dir), *args, check=False)
    assert p.returncode != 0 and "must be" in p.stderr


def test_every_json_stdout_parses_even_on_a_gguf_cache_miss(stories_dir, tmp_path):
    # A subprocess, so that whatever anything prints (transformers, tqdm, warnings) is caught.
    from helpers import write_stories_gguf

    gguf = str(write_stories_gguf(stories_dir, tmp_path / "stories.gguf"))
    text = str(stories_dir.parents[1] / "text" / "tinystories_valid_head.txt")
    runs = {
        "generate": ["generate", "--model", gguf, "--prompt", "Once upon a time", "--max-new-tokens", "8",
                     "--no-chat"],
        "eval": ["eval", "--model", gguf, "--data", text, "--seqlen", "64", "--max-tokens", "256"],
        "prune": ["prune", "--model", gguf, "--method", "wanda", "--calib", text, "--nsamples", "2", "--seqlen",
                  "32", "--device", "cpu", "--out", str(tmp_path / "ck")],
    }
    for cmd, args in runs.items():
        env = {**os.environ, "SPARSE_RUNTIME_CACHE": str(tmp_path / f"cache-{cmd}")}  # each one a cache miss
        p = subprocess.run([sys.executable, "-m", "sparse_runtime", *args, "--json"], capture_output=True, text=True,
                           timeout=300, env=env)
        assert p.returncode == 0, p.stderr
        assert "converting stories.gguf" in p.stderr
        out = json.loads(p.stdout)
        if cmd == "generate":
            assert out["text"] == ", there was a little girl" and out["tokens"] == 8
        elif cmd == "eval":
            assert out["bos"] == "window" and out["tokens"] == 4 * 63
        else:
            assert out["calibration"]["sampling"] == "reference" and out["calibration"]["bos"] == "window"


def test_generated_text_ends_with_a_newline(stories_dir):
    p = _run("generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "5",
             "--no-chat")
    assert p.stdout.endswith("\n") and not p.stdout.endswith("\n\n")


def test_eval_states_the_bos_mode_beside_the_number(stories_dir, capsys):
    from sparse_runtime.data.calibration import BOS_MODES
    text = str(stories_dir.parents[1] / "text" / "tinystories_valid_head.txt")
    results = {}
    for bos in BOS_MODES:
        assert main(["eval", "--model", str(stories_dir), "--data", text, "--seqlen", "64", "--max-tokens", "256",
                     "--bos", bos, "--json"]) == 0
        results[bos] = json.loads(capsys.readouterr().out)
    assert results["auto"] == results["window"] and results["window"]["bos"] == "window"
    assert results["document"]["bos"] == "document" and results["document"]["ppl"] != results["window"]["ppl"]
    main(["eval", "--model", str(stories_dir), "--data", text, "--seqlen", "64", "--max-tokens", "256"])
    assert "BOS per window" in capsys.readouterr().out
