"""Recovery fine-tuning on stories260K pruned 2:4 (Wanda, and SparseGPT after a learned rotation): masks bit-identical
after recover + save + load, every loss trains, resume equals an uninterrupted run, bad input is a clear error, and
the command line end to end."""
import json

import pytest
import torch

from helpers import random_rotations
from sparse_runtime import SparseLinear, load_pretrained
from sparse_runtime.cli import main
from sparse_runtime.data.calibration import DEFAULT_CALIB, DEFAULT_EVAL, calibration_windows
from sparse_runtime.models.checkpoint import read_sparse_config
from sparse_runtime.models.residual_rotation import BUFFER, rotate_model
from sparse_runtime.models.sources import load_model
from sparse_runtime.recover import RecoverConfig, recover
from sparse_runtime.recover.losses import LayerOutputs, squarehead
from sparse_runtime.recover.teacher import TeacherMismatch, residual_bases
from sparse_runtime.recover.windows import calibration_documents, recovery_windows

from conftest import TEXT

SMALL = dict(tokens=6 * 2 * 64, seqlen=64, batch=2, lr=2e-3, eval_windows=2, block_windows=8, progress=False,
             device="cpu")


@pytest.fixture(scope="module")
def checkpoints(stories_dir, tmp_path_factory, one_thread):
    """Wanda 2:4 (also with int8 values), and SparseGPT 2:4 after a learned residual rotation, calibrated on 4 C4
    windows of 64."""
    root = tmp_path_factory.mktemp("recover")
    common = ["prune", "--model", str(stories_dir), "--device", "cpu", "--nsamples", "4", "--seqlen", "64"]
    assert main([*common, "--method", "wanda", "--out", str(root / "wanda")]) == 0
    assert main([*common, "--method", "sparsegpt", "--rotate", "nm", "--rotate-steps", "3",
                 "--out", str(root / "rotated")]) == 0
    assert main([*common, "--method", "wanda", "--quantize", "int8", "--out", str(root / "wanda-int8")]) == 0
    return root


def sparse_state(path):
    model = load_pretrained(path, backend="reference")
    return model, {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def test_no_pruned_weight_moves_through_recover_save_and_load(checkpoints, stories_dir, tmp_path):
    out = tmp_path / "recovered"
    result = recover(checkpoints / "wanda", stories_dir, out=out, loss="kd", **SMALL)
    assert result.finished and result.out == str(out)
    before_model, before = sparse_state(checkpoints / "wanda")
    after_model, after = sparse_state(out)
    assert before.keys() == after.keys() and before
    moved = 0
    for name, layer in before.items():
        new = after[name]
        assert torch.equal(new.weight_meta, layer.weight_meta), name
        assert new.weight_values.dtype == layer.weight_values.dtype
        kept = layer.sparse_weight.mask()
        assert torch.equal(new.sparse_weight.mask(), kept), name
        assert not new.dense_weight()[~kept].any(), f"{name}: a pruned weight moved"
        moved += int(not torch.equal(new.weight_values, layer.weight_values))
    assert moved == len(before)  # every layer's kept weights were trained
    # embeddings and lm_head are not trained; the checkpoint keeps its pruning record and says how it was recovered
    assert torch.equal(after_model.get_input_embeddings().weight, before_model.get_input_embeddings().weight)
    config = read_sparse_config(out)
    assert config["pruning"]["method"] == "wanda" and config["recovery"]["loss"] == "kd"
    # every CPU backend loads it and computes the same function
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = after_model(ids).logits
        for backend in ("decompressed", "auto"):
            assert torch.allclose(load_pretrained(out, backend=backend)(ids).logits, ref, atol=1e-5), backend


def test_a_quantized_checkpoint_recovers_on_its_grid(checkpoints, stories_dir, tmp_path):
    """int8 codes train quantization-aware: the result holds int8 codes under the same scales, on the same masks,
    every layer's codes moved, and the held-out perplexity fell."""
    out = tmp_path / "int8"
    result = recover(checkpoints / "wanda-int8", stories_dir, out=out, loss="kd", code_lr=0.5, **SMALL)
    assert result.evals[-1]["ppl"] < result.evals[0]["ppl"], result.evals
    _, before = sparse_state(checkpoints / "wanda-int8")
    _, after = sparse_state(out)
    assert before.keys() == after.keys() and before
    for name, layer in before.items():
        new = after[name]
        assert new.quant == layer.quant and new.weight_values.dtype == torch.int8, name
        assert torch.equal(new.weight_meta, layer.weight_meta) and torch.equal(new.weight_scales, layer.weight_scales)
        assert not torch.equal(new.weight_values, layer.weight_values), f"{name}: its codes did not train"


def test_quantization_aware_training_keeps_int4_values_on_the_grid(stories_dir, one_thread):
    """Inside the training form a grouped-int4 layer trains its codes as floats and computes with them rounded to
    the grid, times the scales (the gradient passing the rounding, none past the grid's ends); the codes written on
    exit compute exactly that function."""
    from sparse_runtime.format.quant import QuantScheme, unpack_int4
    from sparse_runtime.nn.sparsify import sparsify
    from sparse_runtime.recover.trainable import training_form

    model, _ = load_model(stories_dir)
    sparsify(model, quant=QuantScheme("int4", 32), ignore=("lm_head", "down_proj"), progress=False)  # K = 172
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.quant is not None}
    assert len(layers) == 30
    saved = {n: (m.weight_values.clone(), m.weight_scales.clone(), m.weight_meta.clone()) for n, m in layers.items()}
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with training_form(model):
        codes = layers["model.layers.0.self_attn.q_proj"].parametrizations.weight_values.original
        assert torch.equal(codes, unpack_int4(saved["model.layers.0.self_attn.q_proj"][0]).float())
        with torch.no_grad():
            for m in layers.values():  # off the grid, and the first row past its end
                m.parametrizations.weight_values.original.add_(torch.randn(m.weight_values.shape, generator=g))
            codes[0] = 7 * 3
        logits = model(ids).logits
        logits.square().mean().backward()
        assert codes.grad[0].abs().sum() == 0 and codes.grad[1:].abs().sum() > 0
        inside = logits.detach()
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, inside, rtol=1e-5, atol=1e-5)
    for n, m in layers.items():
        codes, scales, meta = saved[n]
        assert m.quant.name == "int4" and m.weight_values.dtype == torch.uint8 and m.backend == "auto"
        assert torch.equal(m.weight_scales, scales) and torch.equal(m.weight_meta, meta)
        assert not torch.equal(m.weight_values, codes), n


def test_codes_train_at_their_own_learning_rate():
    from sparse_runtime.recover.steps import optimizer, take_step
    from sparse_runtime.recover.trainable import CODES

    params = [(name, torch.nn.Parameter(torch.zeros(3))) for name in ("norm.weight", f"q_proj.{CODES}")]
    config = RecoverConfig(tokens=1, lr=1e-4, code_lr=0.05, warmup=0.0)
    opt = optimizer(params, config)
    for _, p in params:
        p.grad = torch.ones(3)
    take_step(opt, params, config, 0, 10)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-4), pytest.approx(0.05)]
    assert torch.allclose(params[0][1], torch.full((3,), -1e-4))  # Adam's first step: the learning rate
    assert torch.allclose(params[1][1], torch.full((3,), -0.05))


def test_embeddings_train_only_when_asked(checkpoints, stories_dir, tmp_path):
    recover(checkpoints / "wanda", stories_dir, out=tmp_path / "emb", loss="kd", embeddings=True, **SMALL)
    before, _ = sparse_state(checkpoints / "wanda")
    after, layers = sparse_state(tmp_path / "emb")
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert not torch.equal(getattr(after, get)().weight, getattr(before, get)().weight), get
    assert all(not m.dense_weight()[~m.sparse_weight.mask()].any() for m in layers.values())


def test_kd_lowers_the_loss_and_the_held_out_perplexity(checkpoints, stories_dir):
    result = recover(checkpoints / "wanda", stories_dir, loss="kd", eval_every=2 * 2 * 64,
                     **{**SMALL, "tokens": 10 * 2 * 64})
    losses = [r["loss"] for r in result.losses]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert [e["step"] for e in result.evals] == [0, 2, 4, 6, 8, 10]
    assert result.evals[-1]["ppl"] < result.evals[0]["ppl"]
    assert result.tokens == 10 * 2 * 64 and result.tokens_per_s > 0


@pytest.mark.parametrize("loss", ["kd", "squarehead", "ce", "block"])
def test_every_loss_recovers_a_rotated_checkpoint_keeping_its_rotations(checkpoints, stories_dir, tmp_path, loss):
    out = tmp_path / loss
    result = recover(checkpoints / "rotated", None if loss == "ce" else stories_dir, out=out, loss=loss, **SMALL)
    assert result.finished and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.losses)
    assert result.evals[-1]["ppl"] < result.evals[0]["ppl"], result.evals
    before, after = load_pretrained(checkpoints / "rotated"), load_pretrained(out)
    rotations = [(n, b) for n, b in before.named_buffers() if n.endswith((BUFFER, ".rotation"))]
    assert rotations and all(torch.equal(b, after.get_buffer(n)) for n, b in rotations)


def test_the_teacher_meets_a_rotated_student_in_its_coordinates(stories_dir, one_thread):
    dense, _ = load_model(stories_dir)
    rotated, _ = load_model(stories_dir)
    rotate_model(rotated, *random_rotations(rotated, 2))
    bases = residual_bases(rotated, dense)
    assert bases is not None and len(bases) == len(rotated.model.layers)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    states = []
    for model in (rotated, dense):
        taps = LayerOutputs(model)
        with torch.no_grad(), taps.recording() as s:
            model(ids)
        states.append(dict(s))
        taps.remove()
    assert float(squarehead(states[0], states[1], bases)) < 1e-9
    assert float(squarehead(states[0], states[1], None)) > 0.1  # unmapped, the coordinates differ
    assert residual_bases(dense, dense) is None
    other, _ = load_model(stories_dir)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(TeacherMismatch, match="not the teacher's in rotated coordinates"):
        residual_bases(rotated, other)


def test_training_windows_avoid_calibration_and_held_out_documents(checkpoints, stories_dir, tmp_path):
    _, tok = load_model(stories_dir)
    record = read_sparse_config(checkpoints / "wanda")["pruning"]["calibration"]
    assert 1 <= len(calibration_documents(tok, DEFAULT_CALIB, record)) <= 4
    # a small file, calibrated on, then all of the rest of it taken for training
    docs = (TEXT / "c4_validation_2k.jsonl").read_text().splitlines()[:12]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(docs) + "\n")
    record = {**record, "file": str(small), "nsamples": 4}
    calib = calibration_documents(tok, small, record)
    with pytest.warns(UserWarning, match="revisits them"):
        windows = recovery_windows(tok, small, 10_000, 64, 2, record)
    assert windows.info["calibration_documents_excluded"] == len(calib) >= 2

    def grams(rows, n=12):
        return {tuple(r[i:i + n]) for r in rows.tolist() for i in range(len(r) - n + 1)}

    calib_windows = calibration_windows(tok, small, record["nsamples"], record["seqlen"], record["seed"])
    train = grams(windows.train)
    assert not train & grams(windows.held_out) and not train & grams(calib_windows)
    # the same step always reads the same windows; an epoch reads each once
    assert torch.equal(windows.batch(3, 2, 0), windows.batch(3, 2, 0))
    n = len(windows.train)
    assert sorted(windows.rows(0, n, 5).tolist()) == list(range(n))
    other = {**record, "file": str(TEXT / "tinystories_valid_head.txt")}
    assert calibration_documents(tok, DEFAULT_CALIB, other) == set()


@pytest.mark.parametrize("loss", ["kd", "block"])
def test_resume_equals_an_uninterrupted_run(checkpoints, stories_dir, tmp_path, loss):
    path = checkpoints / ("rotated" if loss == "block" else "wanda")
    whole = recover(path, stories_dir, out=tmp_path / "whole", loss=loss, **SMALL)
    state = tmp_path / "state"
    first = recover(path, stories_dir, out=tmp_path / "split", loss=loss, state=str(state), stop_after=4, **SMALL)
    assert not first.finished and first.steps == 4 and not (tmp_path / "split").exists()
    rest = recover(path, stories_dir, out=tmp_path / "split", loss=loss, state=str(state), resume=True, **SMALL)
    assert rest.finished and rest.steps == whole.steps
    assert [r["loss"] for r in rest.losses] == [r["loss"] for r in whole.losses]
    a, b = load_pretrained(tmp_path / "whole").state_dict(), load_pretrained(tmp_path / "split").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        recover(path, stories_dir, loss=loss, state=str(state), resume=True, **{**SMALL, "lr": 1e-3})


def test_bad_settings_are_refused_before_any_work():
    for fields, message in [({"tokens": 0}, "tokens must be a positive integer"),
                            ({"loss": "mse"}, "loss must be one of"),
                            ({"resume": True}, "need a state folder"),
                            ({"lr": 0}, "need lr > 0"),
                            ({"code_lr": -1.0}, "code_lr > 0"),
                            ({"keep_best": True, "loss": "block"}, "keep_best needs an end-to-end loss"),
                            ({"keep_best": True, "state": "s", "stop_after": 3}, "keep_best is not resumable"),
                            ({"keep_best": True, "state": "s", "save_every": 3}, "keep_best is not resumable")]:
        with pytest.raises(ValueError, match=message):
            RecoverConfig(**fields)


@pytest.mark.parametrize("extra,message", [
    (["--tokens", "0"], "tokens must be a positive integer"),
    (["--tokens", "-5"], "tokens must be a positive integer"),
    (["--data", "MISSING"], "not found"),
    (["--data", str(DEFAULT_EVAL)], "is an evaluation text"),
    (["--teacher", "OTHER_VOCAB"], "vocabulary of 128 tokens, the student 512"),
    (["--teacher", None], "needs a teacher"),
    (["--keep-best", "--save-every", "2"], "keep_best is not resumable"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(checkpoints, stories_dir, tmp_path, capsys, extra, message):
    from helpers import tiny_model

    if "OTHER_VOCAB" in extra:  # a Llama with a 128-token vocabulary, stories260K's tokenizer beside it
        other = tmp_path / "other"
        tiny_model("llama").save_pretrained(other)
        load_model(stories_dir)[1].save_pretrained(other)
    out = tmp_path / "out"
    argv = ["recover", "--model", str(checkpoints / "wanda"), "--teacher", str(stories_dir), "--tokens", "256",
            "--seqlen", "64", "--batch", "2", "--device", "cpu", "--out", str(out)]
    if extra[0] == "--teacher":
        i = argv.index("--teacher")
        del argv[i:i + 2]
        extra = [] if extra[1] is None else ["--teacher", str(tmp_path / "other")]
    extra = [str(tmp_path / "missing.txt") if a == "MISSING" else a for a in extra]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "sparse-runtime recover: error:" in err and message in err, err
    assert not out.exists() and not (tmp_path / "out.state").exists()


def test_recover_from_the_command_line(checkpoints, stories_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["recover", "--model", str(checkpoints / "wanda"), "--teacher", str(stories_dir), "--tokens", "768",
            "--seqlen", "64", "--batch", "2", "--lr", "2e-3", "--eval-windows", "2", "--eval-every", "384",
            "--device", "cpu", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["finished"] and report["out"] == str(out) and report["tokens"] == 768
    assert [e["tokens"] for e in report["evals"]] == [0, 384, 768]
    assert report["evals"][-1]["ppl"] < report["evals"][0]["ppl"] and report["tokens_per_s"] > 0
    model, tok = load_model(out)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 35


@pytest.mark.parametrize("native", [True, False])
def test_autocast_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    from sparse_runtime.recover.steps import autocast

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    with autocast(cpu, RecoverConfig(tokens=1)):
        assert torch.is_autocast_enabled("cpu") == native
    with autocast(cpu, RecoverConfig(tokens=1, autocast=False)):
        assert not torch.is_autocast_enabled("cpu")


def test_keep_best_ends_with_the_weights_of_the_lowest_held_out_perplexity(checkpoints, stories_dir, tmp_path,
                                                                            monkeypatch):
    from sparse_runtime.recover import trainer

    scripted = iter([50.0, 40.0, 30.0, 45.0, 35.0])  # before, after steps 2, 4, 6 and the end (8): best at step 4
    monkeypatch.setattr(trainer, "held_out_perplexity", lambda *a: next(scripted))
    seen = {}

    def snapshot(model):  # every layer's values at each evaluation
        seen[len(seen)] = {n: m.weight_values.detach().clone() for n, m in model.named_modules()
                           if isinstance(m, SparseLinear)}
        return {}

    out = tmp_path / "best"
    result = recover(checkpoints / "wanda", stories_dir, out=out, loss="kd", keep_best=True, evaluate=snapshot,
                     **{**SMALL, "tokens": 8 * 2 * 64, "eval_every": 2 * 2 * 64})
    assert result.kept == {"step": 4, "tokens": 4 * 2 * 64, "ppl": 30.0} and len(seen) == 5
    _, layers = sparse_state(out)
    assert read_sparse_config(out)["recovery"]["kept_best"]["step"] == 4
    for name, layer in layers.items():
        kept = seen[2][name].to(layer.weight_values.dtype)
        torch.testing.assert_close(layer.weight_values, kept, rtol=0, atol=0)
    assert any(not torch.equal(seen[2][n], seen[4][n]) for n in layers)  # the last step's differ: a real choice
