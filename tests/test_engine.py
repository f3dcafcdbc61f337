import pytest
import torch

from helpers import tiny_model
from sparse_runtime import sparsify
from sparse_runtime.serving.engine import Engine, Request, SamplingParams
from sparse_runtime.models.sources import load_model

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a big", "Sun"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_model(stories_dir)


def hf_greedy(model, ids, n):
    x = torch.tensor([ids])
    return model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n)[0, len(ids):].tolist()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def test_batched_greedy_equals_hf_generate_per_prompt(stories):
    model, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS]
    reqs = Engine(model, tok, max_batch=4).generate([Request(i, greedy(20)) for i in ids])
    for i, r in zip(ids, reqs):
        assert r.output_ids == hf_greedy(model, i, 20)
        assert r.finish_reason == "length"
        assert r.text == tok.decode(r.output_ids, skip_special_tokens=True)


def test_continuous_batching_joins_and_leaves(stories):
    model, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS]
    alone = [Engine(model, tok, max_batch=1).generate([Request(i, greedy(n))])[0].output_ids
             for i, n in zip(ids, (5, 17, 9, 12))]
    engine = Engine(model, tok, max_batch=2)
    reqs = [Request(i, greedy(n)) for i, n in zip(ids, (5, 17, 9, 12))]
    engine.add(reqs[0])
    engine.step()
    engine.step()
    for r in reqs[1:]:  # join a running batch mid-flight; more than max_batch wait their turn
        engine.add(r)
    seen = 0
    while not all(r.done for r in reqs):
        engine.step()
        seen = max(seen, engine.num_running)
        assert engine.num_running <= 2
    assert seen == 2 and engine.num_running == 0 and engine.num_waiting == 0
    assert [r.output_ids for r in reqs] == alone


def test_static_shapes_path_matches(stories):
    model, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    a = Engine(model, tok, max_batch=4, max_seq_len=64).generate([Request(i, greedy(10)) for i in ids])
    b = Engine(model, tok, max_batch=4, max_seq_len=64, static=True).generate([Request(i, greedy(10)) for i in ids])
    assert [r.output_ids for r in a] == [r.output_ids for r in b]


@pytest.mark.slow
def test_compiled_decode_matches_eager(stories):
    """torch.compile of the decode step (inductor on the CPU, dynamic shapes): the same greedy tokens for a
    batch whose size and lengths change as requests join and leave."""
    model, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    reqs = lambda: [Request(i, greedy(6 + 3 * k)) for k, i in enumerate(ids)]
    a = Engine(model, tok, max_batch=2, max_seq_len=64).generate(reqs())
    b = Engine(model, tok, max_batch=2, max_seq_len=64, compile=True).generate(reqs())
    assert [r.output_ids for r in a] == [r.output_ids for r in b]


def test_sampling_seeded_and_independent_of_batch(stories):
    model, tok = stories
    ids = tok("Once").input_ids
    p = lambda seed: SamplingParams(max_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=seed, ignore_eos=True)
    alone = Engine(model, tok, max_batch=1).generate([Request(ids, p(1))])[0].output_ids
    batch = Engine(model, tok, max_batch=3).generate([Request(ids, p(2)), Request(ids, p(1)), Request(ids, p(3))])
    assert batch[1].output_ids == alone
    assert batch[0].output_ids != alone


def test_stop_string_cuts_text_and_stream_never_shows_it(stories):
    model, tok = stories
    ids = tok("Once upon a time").input_ids
    full = Engine(model, tok, 1).generate([Request(ids, greedy(20))])[0].text
    assert "Lily" in full
    r = Request(ids, greedy(20, stop=("Lily", "zzz")))
    pieces = list(Engine(model, tok, 1).stream(r))
    assert r.finish_reason == "stop"
    assert r.text == full[:full.index("Lily")]
    assert "".join(pieces) == r.text


def test_eos_stops(stories):
    model, tok = stories
    ids = tok("Once upon a time").input_ids
    first = Engine(model, tok, 1).generate([Request(ids, greedy(5))])[0].output_ids
    engine = Engine(model, tok, 1)
    engine.eos = {first[2]}
    r = engine.generate([Request(ids, SamplingParams(max_tokens=5))])[0]
    assert r.output_ids == first[:2] and r.finish_reason == "stop"


def test_prompt_and_token_logprobs_match_a_direct_forward(stories):
    model, tok = stories
    ids = tok("Once upon a time there").input_ids
    r = Engine(model, tok, 1).generate([Request(ids, greedy(1, logprobs=2, prompt_logprobs=True))])[0]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    for t in range(1, len(ids)):
        assert r.prompt_logprobs[t].token == ids[t]
        assert r.prompt_logprobs[t].logprob == pytest.approx(float(lp[t - 1, ids[t]]), abs=1e-4)
        assert r.prompt_logprobs[t].top[0][0] == int(lp[t - 1].argmax())
    assert r.logprobs[0].token == int(lp[-1].argmax()) == r.output_ids[0]
    assert r.logprobs[0].logprob == pytest.approx(float(lp[-1].max()), abs=1e-4)
    zero = Engine(model, tok, 1).generate([Request(ids, greedy(0, prompt_logprobs=True))])[0]
    assert zero.output_ids == [] and zero.finish_reason == "length" and len(zero.prompt_logprobs) == len(ids)


def test_abort_frees_the_slot(stories):
    model, tok = stories
    engine = Engine(model, tok, max_batch=1)
    a, b = Request(tok("Once").input_ids, greedy(50)), Request(tok("Sun").input_ids, greedy(3))
    engine.add(a)
    engine.add(b)
    engine.step()
    engine.abort(a)
    engine.generate([])
    while not b.done:
        engine.step()
    assert a.finish_reason == "abort" and len(a.output_ids) < 50 and b.finish_reason == "length"


@pytest.mark.parametrize("bad, match", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(logprobs=21), "logprobs"), (dict(max_tokens=10**6), "context")])
def test_bad_params(stories, bad, match):
    model, tok = stories
    with pytest.raises(ValueError, match=match):
        Engine(model, tok, 1).add(Request([1, 2], SamplingParams(**bad)))


def test_empty_prompt_and_bad_batch(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="no tokens"):
        Engine(model, tok, 1).add(Request([], SamplingParams()))
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, tok, 0)


@pytest.mark.parametrize("backend", ["reference", "decompressed"])
def test_sparse_model_matches_hf_generate(stories_dir, backend):
    model, tok = load_model(stories_dir)
    sparsify(model, pattern="2:4", backend=backend)
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    reqs = Engine(model, tok, 2).generate([Request(i, greedy(10)) for i in ids])
    assert [r.output_ids for r in reqs] == [hf_greedy(model, i, 10) for i in ids]


def test_rotated_sparse_checkpoint_matches_hf_generate(stories_dir, tmp_path):
    from sparse_runtime import load_pretrained, save_pretrained
    from sparse_runtime.models.residual_rotation import rotate_model

    model, tok = load_model(stories_dir)
    gen = torch.Generator().manual_seed(0)
    q1s = [torch.linalg.qr(torch.randn(64, 64, generator=gen))[0] for _ in model.model.layers]
    r2s = [torch.linalg.qr(torch.randn(4, 8, 8, generator=gen))[0] for _ in model.model.layers]
    rotate_model(model, q1s, r2s)  # the engine runs the decoder layers' own forward: their boundary hooks run
    sparsify(model, pattern="2:4", backend="reference")
    save_pretrained(model, tmp_path / "ckpt")
    model = load_pretrained(tmp_path / "ckpt", backend="decompressed")
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    reqs = Engine(model, tok, 2).generate([Request(i, greedy(10)) for i in ids])
    assert [r.output_ids for r in reqs] == [hf_greedy(model, i, 10) for i in ids]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_families_match_hf_generate(family):
    model = tiny_model(family)

    class Tok:  # the engine needs decode and eos only
        eos_token_id = None
        decode = staticmethod(lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))

    model.generation_config.eos_token_id = None
    ids = [[3, 7, 9, 11, 2], [5, 6]]
    reqs = Engine(model, Tok(), 2).generate([Request(i, greedy(8)) for i in ids])
    assert [r.output_ids for r in reqs] == [hf_greedy(model, i, 8) for i in ids]


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate():
    model, tok = load_model("smollm2-135m")
    ids = [tok(p).input_ids for p in ("The capital of France is", "def fibonacci(n):")]
    reqs = Engine(model, tok, 2, max_seq_len=64).generate([Request(i, greedy(16)) for i in ids])
    assert [r.output_ids for r in reqs] == [hf_greedy(model, i, 16) for i in ids]
