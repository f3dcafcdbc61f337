import pytest
import torch

from sparse_runtime.serving.engine import sample
from sparse_runtime.serving.generate import stream_generate
from sparse_runtime.models.sources import load_model
from test_engine import EOS_PROMPT, eos_model  # noqa: F401  (fixture: EOS right after EOS_PROMPT)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_model(stories_dir)


def test_greedy_stream_matches_known_story_and_hf_generate(stories):
    model, tok = stories
    tokens = list(stream_generate(model, tok, "Once upon a time", max_new_tokens=12))
    text = "".join(t.text for t in tokens)
    assert text.startswith(", there was a little girl named Lily.")
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert [t.id for t in tokens] == ref.tolist()


def test_generation_uses_the_supported_cache_api(stories):
    # transformers 5.24 deprecates the decoder's past_key_values (removed in 5.40) with a FutureWarning raised
    # from the caller: the engine passes the cache under the name the installed decoder takes.
    import warnings

    model, tok = stories
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert len(list(stream_generate(model, tok, "Once upon a time", max_new_tokens=3))) == 3


def test_sampling_is_seeded(stories):
    model, tok = stories
    run = lambda seed: [t.id for t in stream_generate(model, tok, "Once", 10, temperature=1.0, top_p=0.9, seed=seed)]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sample_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    assert sample(logits) == 1
    picks = {sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {1, 2}
    picks = {sample(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)) for s in range(40)}
    assert picks == {1}


def test_bad_arguments(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_generate(model, tok, "x", 0))
    with pytest.raises(ValueError, match="context"):
        list(stream_generate(model, tok, "x", 10**6))
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(3), temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(3), 1.0, top_p=1.5)


def test_eos_ends_the_stream_without_a_token(eos_model):
    model, tok, _, _ = eos_model  # the engine returns the EOS as an output token; the text stream does not
    assert list(stream_generate(model, tok, EOS_PROMPT, max_new_tokens=5)) == []
