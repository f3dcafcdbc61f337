import pytest
import torch

from helpers import tiny_model
from sparse_runtime import SparseLinear, sparsify
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.ops import cpu24
from sparse_runtime.serving.detokenize import Detokenizer, token_texts
from sparse_runtime.serving.engine import ContextLengthError, Engine, Request, SamplingParams
from sparse_runtime.serving.generate import stream_generate
from sparse_runtime.models.sources import load_model

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw a big", "Sun"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_model(stories_dir)


EOS_PROMPT = "Once upon a time there was a little"


@pytest.fixture(scope="module")
def eos_model(stories_dir):
    """stories260K made to predict EOS right after EOS_PROMPT (its EOS row of lm_head becomes 1.5x the row of the
    token it predicted there), with its own log-softmax over the prompt."""
    model, tok = load_model(stories_dir)
    ids = tok(EOS_PROMPT).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = int(logits.argmax())
        assert logits[top] > 0
        w = model.get_output_embeddings().weight  # tied: EOS's input embedding changes too; it is never an input
        w[tok.eos_token_id] = 1.5 * w[top]
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert int(ref[-1].argmax()) == tok.eos_token_id
    return model, tok, ids, ref


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
        # the text continues the prompt's (SentencePiece: a first token's leading space is kept)
        prompt = tok.decode(i, skip_special_tokens=True)
        assert prompt + r.text == tok.decode(i + r.output_ids, skip_special_tokens=True)


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
    batch whose size and lengths change as requests join and leave. Regional: one graph of the decoder layer serves
    all 5 layers, the lm_head its own (batch 1 gets its own of each: dynamo specialises size 1), the generated code
    rechecks no sizes, and the model is left as it was."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    model, tok = stories
    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    reqs = lambda: [Request(i, greedy(6 + 3 * k)) for k, i in enumerate(ids)]
    a = Engine(model, tok, max_batch=2, max_seq_len=64).generate(reqs())
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):  # generate the code here, to read it
        engine = Engine(model, tok, max_batch=2, max_seq_len=64, compile=True)
        b, code = run_and_get_code(lambda: engine.generate(reqs()))
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert code and not any("assert_size_stride(" in c for c in code)  # no per-call Python asserts (CPU_COMPILE)
    assert counters["stats"]["unique_graphs"] == 4  # (layer, lm_head) x (batch 2, batch 1), not per layer
    assert all("forward" not in m.__dict__ for m in [*model.model.layers, model.lm_head])
    assert [r.output_ids for r in Engine(model, tok, max_batch=2, max_seq_len=64).generate(reqs())] == \
        [r.output_ids for r in a]


@pytest.mark.slow
@pytest.mark.skipif(not cpu24.available(), reason="the cpu24 extension is not built")
def test_compiled_2_4_int8_layer_makes_one_call_per_input(stories_dir):
    """The engine fuses q/k/v and gate/up (fused_projections): the compiled decoder layer calls the 2:4 kernel once
    for q/k/v and once for gate/up, and greedy tokens equal the unfused eager model's."""
    from torch._inductor.utils import run_and_get_code

    model, tok = load_model(stories_dir)
    sparsify(model, pattern="2:4", quant=QuantScheme("int8"), progress=False)
    layer = [m for m in model.model.layers[0].modules() if isinstance(m, SparseLinear)]
    on_cpu = sum(m.active_backend == "cpu" for m in layer)
    assert on_cpu == 6  # down_proj's K = 172 is not a multiple of 8: it runs on decompressed
    ids = [tok(p).input_ids for p in PROMPTS[:2]]
    want = [hf_greedy(model, i, 8) for i in ids]
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        engine = Engine(model, tok, max_batch=2, max_seq_len=64, compile=True)
        reqs, code = run_and_get_code(lambda: engine.generate([Request(i, greedy(8)) for i in ids]))
    assert [r.output_ids for r in reqs] == want
    calls = [c.count("torch.ops.sparse_runtime.cpu24_linear.default(") for c in code]
    assert max(calls) == on_cpu - 3, calls  # q/k/v: one call, not three; gate/up: one, not two


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


def first_text(tok, prompt, out):
    return tok.decode(prompt + out, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


def test_eos_stops(stories):
    model, tok = stories
    ids = tok("Once upon a time").input_ids
    first = Engine(model, tok, 1).generate([Request(ids, greedy(5))])[0].output_ids
    engine = Engine(model, tok, 1)
    engine.eos = {first[2]}
    r = engine.generate([Request(ids, SamplingParams(max_tokens=5, logprobs=0))])[0]
    # the EOS is an output token with its logprob (as OpenAI returns it), and adds no text
    assert r.output_ids == first[:3] and r.finish_reason == "stop" and len(r.logprobs) == 3
    assert r.text == "".join(e.text for e in r.logprobs) == first_text(tok, ids, first[:2])
    assert r.logprobs[2].token == first[2] and r.logprobs[2].text == ""


def test_prompt_and_token_logprobs_match_a_direct_forward(stories):
    model, tok = stories
    ids = tok("Once upon a time there").input_ids
    r = Engine(model, tok, 1).generate([Request(ids, greedy(1, logprobs=2, prompt_logprobs=True))])[0]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert r.prompt_logprobs[0].logprob is None and len(r.prompt_logprobs) == len(ids)
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
    with pytest.raises(ValueError, match="compile must be one of"):
        Engine(model, tok, 1, compile="max_autotune")  # the mode is spelled with a hyphen


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


# ---- detokenization: each token's text in context ---------------------------------------------------------
TEXT = "Once upon a time there was a café in 日本 😀 — naïve!"


@pytest.fixture(scope="module")
def byte_bpe():
    """A small byte-level BPE tokenizer (GPT-2/SmolLM2 style): multi-byte characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tk.train_from_iterator(["Once upon a time there was a little girl named Lily.", "日本語の本"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def split_characters(tok, ids):
    """Whether some token of ``ids`` holds only part of a character (decoded alone it shows U+FFFD)."""
    return any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("which", ["sentencepiece", "byte_bpe"])
def test_token_texts_join_to_decode(stories, byte_bpe, which):
    tok = stories[1] if which == "sentencepiece" else byte_bpe
    ids = tok(TEXT).input_ids
    assert split_characters(tok, ids)  # stories260K: byte fallback; BPE: bytes
    texts = token_texts(tok, ids)
    assert len(texts) == len(ids) and "".join(texts) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in t for t in texts)  # a partial character waits for the token completing it
    # in context of a prefix: the pieces continue its text (the leading space of "▁upon" is kept)
    d = Detokenizer(tok, ids[:3])
    rest = "".join(d.add(i) for i in ids[3:]) + d.flush()
    assert tok.decode(ids[:3], skip_special_tokens=True) + rest == tok.decode(ids, skip_special_tokens=True)


def test_flush_shows_a_cut_character_as_decode_does(byte_bpe):
    tok = byte_bpe
    ids = tok("日本").input_ids
    d = Detokenizer(tok)
    assert d.add(ids[0]) == "" and d.peek(ids[1]) == tok.decode(ids[:2])
    assert d.flush() == tok.decode(ids[:1]) == "\ufffd"


def test_byte_bpe_engine_stream_equals_decode(byte_bpe):
    """A random model over a byte-level BPE vocabulary emits arbitrary byte tokens: the streamed deltas join to
    the decode of all generated ids (partial characters held back, the end flushed as decode shows it)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=len(byte_bpe), max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    prompt = byte_bpe("A café in").input_ids
    for seed in range(3):
        r = Request(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True, logprobs=0))
        pieces = list(Engine(model, byte_bpe, 1, max_seq_len=64).stream(r))
        assert split_characters(byte_bpe, r.output_ids)
        assert "".join(pieces) == r.text == byte_bpe.decode(r.output_ids) == "".join(e.text for e in r.logprobs)


def test_context_length_is_one_rule(stories):
    model, tok = stories
    engine = Engine(model, tok, 1, max_seq_len=32)
    with pytest.raises(ContextLengthError) as e:
        engine.add(Request([1] * 30, SamplingParams(max_tokens=3)))
    assert str(e.value) == str(ContextLengthError(30, 3, 32)) and e.value.param == "max_tokens"
    with pytest.raises(ContextLengthError) as e:
        engine.add(Request([1] * 32, SamplingParams(max_tokens=0, prompt_logprobs=True)))
    assert e.value.param == "prompt"
    engine.add(Request([1] * 29, SamplingParams(max_tokens=3)))  # fits exactly
    assert Engine(model, tok, 1, max_seq_len=10**6).max_seq_len == model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="exceeds the context of 512 tokens"):
        list(stream_generate(model, tok, "Once", max_new_tokens=600))
