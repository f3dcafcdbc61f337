"""sparse_runtime.ops.triton_launch: the direct launch of a compiled Triton kernel, against a fake compiled kernel,
and the installed triton's own launch path read back (the call the adapter makes must be the one JITFunction makes)."""
import inspect
import types

from sparse_runtime.ops.triton_launch import direct_launch


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
    return types.SimpleNamespace(calls=list(calls))


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


def test_the_installed_triton_launches_the_same_way():
    """JITFunction.run and CompiledKernel.__getitem__ of this triton call ``run`` with the arguments the adapter
    passes, in the same order; its hooks are HookChains (empty unless a profiler adds one)."""
    import re

    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    call = re.compile(r"\.run\(\s*[\w\[\]]+,\s*[\w\[\]]+,\s*[\w\[\]]+,\s*stream,\s*(?:kernel|self)\.function,\s*"
                      r"(?:kernel|self)\.packed_metadata,\s*launch_metadata,\s*knobs\.runtime\.launch_enter_hook,"
                      r"\s*knobs\.runtime\.launch_exit_hook,\s*\*(?:bound_args\.values\(\)|args)\)")
    assert call.search(inspect.getsource(JITFunction.run))
    assert call.search(inspect.getsource(CompiledKernel.__getitem__))
    assert isinstance(CompiledKernel.run, property)
    assert list(inspect.signature(CompiledKernel.launch_metadata).parameters) == ["self", "grid", "stream", "args"]
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        assert hook.calls == []
