"""sparse_runtime.ops.triton_launch: the direct launch of a compiled Triton kernel, against a fake compiled kernel and
against ``kernel[grid]`` on the interpreter, and the rows a warm-up runs. (The launch path as a whole, plans and
specialisations included, is tested in test_triton_ops.)"""
import inspect
import types

import pytest
import torch

from sparse_runtime.ops.caches import m_bucket
from sparse_runtime.ops.triton_launch import bucket_rows, direct_launch, specialisation
from sparse_runtime.ops.triton_plan import kernels
from sparse24_cases import assert_close, random_layer, reference


class Compiled:
    """A CompiledKernel's launch surface: ``run`` loads the module (setting ``function``) on first access."""

    function, packed_metadata = None, "packed"

    def __init__(self):
        self.calls, self.metadata_calls = [], []

    @property
    def run(self):
        self.function = "cufunction"
        return lambda *a: self.calls.append(a)

    def launch_metadata(self, grid, stream, *args):
        self.metadata_calls.append((grid, stream, args))
        return "metadata"


def chain(*calls):
    return types.SimpleNamespace(calls=list(calls), launch_enter_hook=None, launch_exit_hook=None)


def test_launches_with_every_parameter_and_no_hooks():
    c = Compiled()
    hooks = types.SimpleNamespace(launch_enter_hook=chain(), launch_exit_hook=chain())
    launch = direct_launch(c, ("const", 8), hooks)
    launch(12, 3, 77, "x", 5)
    assert c.calls == [(12, 3, 1, 77, "cufunction", "packed", None, None, None, "x", 5, "const", 8)]
    assert c.metadata_calls == []  # only hooks read the launch metadata


def test_installed_hooks_get_the_launch_metadata():
    c = Compiled()
    enter, leave = chain(print), chain()
    launch = direct_launch(c, (), types.SimpleNamespace(launch_enter_hook=enter, launch_exit_hook=leave))
    launch(2, 1, 5, "x")
    assert c.calls == [(2, 1, 1, 5, "cufunction", "packed", "metadata", enter, leave, "x")]
    assert c.metadata_calls == [((2, 1, 1), 5, ("x",))]


def test_no_direct_launch_without_a_compiled_kernel():
    assert direct_launch(None, ()) is None  # the interpreter returns no compiled kernel


class Interpreted:
    """A compiled kernel whose launcher runs the real kernel on the interpreter with the parameters it is given, as
    Triton's launcher does: ``run(grid_0, grid_1, grid_2, stream, function, packed, metadata, enter, exit,
    *every_parameter)``."""

    function, packed_metadata = "function", "packed"

    def run(self, grid_0, grid_1, grid_2, stream, function, packed, metadata, enter, leave, *params):
        kernels().sparse24_matmul_kernel[grid_0, grid_1, grid_2](*params)


@pytest.mark.parametrize("split", [1, 2])
def test_a_direct_launch_computes_what_kernel_grid_does(split):
    kernel = kernels().sparse24_matmul_kernel
    m, n, k = 5, 33, 72
    sw, values, meta = random_layer(n, k, torch.float32, seed=3)
    x, bias = torch.randn(m, k), torch.randn(n)
    const = dict(HAS_BIAS=True, ROT=kernels().ROT_NONE.value, ROT_B=1, DOT_PREC="ieee", SWAP_AB=True,
                 BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    params = list(inspect.signature(kernel.fn).parameters.values())
    runtime = [p.name for p in params].index("HAS_BIAS")
    constexprs = tuple(const.get(p.name, p.default) for p in params[runtime:])  # signature order, defaults too

    def args(out):
        ws, locks = torch.empty(split, m, n), torch.zeros(2, dtype=torch.int32)  # 2 N tiles of 32
        return x, values, meta, x, x, bias, out, ws, locks, m, n, k, 8, k, k // 2, (k + 31) // 32, n

    grid = (2, split)
    expected = torch.full((m, n), float("nan"))
    kernel[grid](*args(expected), **const)
    got = torch.full((m, n), float("nan"))
    direct_launch(Interpreted(), constexprs, chain())(*grid, 0, *args(got))
    assert torch.equal(got, expected)
    assert_close(got, *reference(x, sw, bias), torch.float32)


def test_bucket_rows_reach_every_specialisation_of_the_bucket():
    def spec(m):
        x = torch.empty(m, 4)
        return specialisation((x, None, None, None, x, x, None, None, None, m))

    for bucket in [1 << i for i in range(14)]:
        rows = bucket_rows(bucket)
        assert all(m_bucket(r) == bucket for r in rows)
        assert {spec(r) for r in rows} == {spec(m) for m in range(bucket // 2 + 1, bucket + 1)}, bucket
