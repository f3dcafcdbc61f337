import pytest
import torch
from torch import nn

from helpers import tiny_model
from sparse_runtime import SparseLinear, load_pretrained, save_pretrained, sparsify
from sparse_runtime.format.quant import QuantScheme
from sparse_runtime.nn.fused_projections import fusible, fuse, fuse_projections
from sparse_runtime.ops import cpu24

QUANTS = [None, QuantScheme("int8"), QuantScheme("int4", 32)]
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not cpu24.available(), reason="no cpu24"))]


def _members(sizes=(40, 24, 8), k=72, quant=None, backend="reference", bias=True):
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    k = 96 if quant is not None and quant.group_size else k  # int4 groups of 32 divide K
    return [SparseLinear.from_linear(nn.Linear(k, n, bias=bias), backend=backend, quant=quant) for n in sizes]


def _float64(layer, x):
    y = x.double() @ layer.dense_weight().double().T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.name if q else "fp32")
@pytest.mark.parametrize("bias", [True, False])
def test_fused_members_match_float64_and_share_one_copy(backend, quant, bias):
    members = _members(quant=quant, backend=backend, bias=bias)
    x = torch.randn(3, 5, members[0].in_features)
    alone = [m(x) for m in members]
    group = fuse(members)
    outs = [m(x) for m in members]
    for m, out, ref in zip(members, outs, alone):
        assert out.shape == (3, 5, m.out_features)
        torch.testing.assert_close(out.double(), _float64(m, x), rtol=1e-5, atol=1e-5)
        if backend == "cpu":  # rows are independent in the kernel: the same bits as each layer alone
            assert torch.equal(out, ref)
    # one copy: the members' tensors are views of the fused ones
    for name in ["weight_values", "weight_meta"] + (["weight_scales"] if quant else []) + (["bias"] if bias else []):
        ptrs = {getattr(m, name).untyped_storage().data_ptr() for m in members}
        assert ptrs == {getattr(group.linear, name).untyped_storage().data_ptr()}
    assert group._call is None  # every member took its output: no activations held


def test_one_call_serves_all_members_and_another_input_recomputes():
    members = _members()
    group = fuse(members)
    calls = []
    group.linear.register_forward_hook(lambda *a: calls.append(1))
    x, other = torch.randn(2, 72), torch.randn(2, 72)
    members[0](x), members[1](x), members[2](x)
    assert len(calls) == 1
    q = members[0](x)
    k = members[1](other)  # not the input q was computed on: a fresh call, never q's input's slice
    torch.testing.assert_close(k.double(), _float64(members[1], other), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.double(), _float64(members[0], x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


def test_state_dict_unchanged_and_a_reload_or_move_unfuses():
    members = _members()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    fuse(members)
    for m, sd in zip(members, before):
        after = m.state_dict()
        assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    x = torch.randn(4, 72)
    members[1].load_state_dict(before[1], assign=True)  # replaces the views: that member computes alone again
    assert members[1]._fused is None and members[0]._fused is not None
    torch.testing.assert_close(members[1](x).double(), _float64(members[1], x), rtol=1e-5, atol=1e-5)
    members[0].to(torch.bfloat16)
    assert members[0]._fused is None and members[0](x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("change, why", [
    (lambda ms: ms[1].set_backend("decompressed"), "backend differs"),
    (lambda ms: ms.__setitem__(1, _members(quant=QuantScheme("int8"))[1]), "quant differs"),
    (lambda ms: ms.__setitem__(1, _members(k=80)[1]), "in_features differs"),
    (lambda ms: ms[2].set_rotation(torch.linalg.qr(torch.randn(72, 72))[0]), "rotations differ"),
    (lambda ms: ms.__setitem__(2, nn.Linear(72, 8)), "not all SparseLinear"),
])
def test_refuses_projections_that_cannot_share_a_call(change, why):
    members = _members()
    change(members)
    assert why in fusible(members)
    with pytest.raises(ValueError, match=why):
        fuse(members)


def test_bias_on_some_members_only_is_refused():
    members = _members()
    members[2] = _members(bias=False)[2]
    assert "bias" in fusible(members)


@pytest.mark.parametrize("quant", QUANTS[:2], ids=["fp32", "int8"])
def test_model_fuses_qkv_and_gate_up_and_saves_as_before(tmp_path, quant):
    model = tiny_model("llama")
    sparsify(model, pattern="2:4", quant=quant, progress=False)
    ids = torch.tensor([[3, 7, 9, 11, 2]])
    with torch.no_grad():
        ref = model(ids).logits
    assert fuse_projections(model) == 2 * 2  # (q/k/v, gate/up) x 2 layers
    assert fuse_projections(model) == 0  # already fused
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    save_pretrained(model, tmp_path / "ckpt")  # the members are views of one storage: each is written as itself
    loaded = load_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_a_backend_refusing_the_stacked_weight_leaves_the_members_alone(monkeypatch):
    """A backend that runs each projection but not their concatenation: fuse() raises before changing any member,
    fuse_projections() skips the group, and the layers compute as before."""
    from sparse_runtime import backends
    from sparse_runtime.errors import BackendUnavailable

    model = tiny_model("llama")
    sparsify(model, pattern="2:4", progress=False)
    ids = torch.tensor([[3, 7, 9, 11, 2]])
    with torch.no_grad():
        ref = model(ids).logits
    resolve = backends.resolve

    def refusing(name, layer):
        if layer.out_features > 128:  # the widest member: intermediate_size 128; stacked q/k/v 128, gate/up 256
            raise BackendUnavailable(f"{layer.describe()}: too wide")
        return resolve(name, layer)
    monkeypatch.setattr(backends, "resolve", refusing)
    mlp = model.model.layers[0].mlp
    values = mlp.gate_proj.weight_values
    with pytest.raises(BackendUnavailable, match="too wide"):
        fuse([mlp.gate_proj, mlp.up_proj])
    assert mlp.gate_proj.weight_values is values and mlp.gate_proj._fused is None
    assert fuse_projections(model) == 2  # q/k/v (64 + 32 + 32 rows) in both layers; gate/up refused
    assert model.model.layers[1].mlp.up_proj._fused is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
