import json
import subprocess
import sys

import pytest

from sparse_runtime.cli import build_parser, main


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


def test_info_text_lists_unavailable_reasons(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "reference" in out and "device:" in out


def test_subcommands_exist():
    parser = build_parser()
    minimal = {"generate": ["--prompt", "x"], "prune": ["--out", "x"]}
    for cmd in ("info", "generate", "prune", "eval", "bench", "serve"):
        assert parser.parse_args([cmd, *minimal.get(cmd, [])]).command == cmd


def test_generate_streams_from_folder_and_checkpoint(stories_dir, tmp_path):
    p = _run("generate", "--model", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "10",
             "--no-chat")
    assert p.stdout.startswith(", there was a little girl named Lily")
    assert "tok/s" in p.stderr
    from sparse_runtime import save_pretrained, sparsify
    from sparse_runtime.models import load_model

    model, tok = load_model(stories_dir)
    sparsify(model)
    save_pretrained(model, tmp_path / "ck", tokenizer=tok)
    p = _run("generate", "--model", str(tmp_path / "ck"), "--prompt", "Once upon a time", "--max-new-tokens", "5")
    assert len(p.stdout.strip()) > 0


def test_generate_bad_model_is_clear_error():
    p = _run("generate", "--model", "/nonexistent/model", check=False)
    assert p.returncode != 0 and "not a folder" in p.stderr


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--max-new-tokens", "0"]])
def test_generate_bad_arguments(stories_dir, args):
    p = _run("generate", "--model", str(stories_dir), *args, check=False)
    assert p.returncode != 0 and "must be" in p.stderr
