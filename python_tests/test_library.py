"""Packaging-level behaviour: the registered torch ops, backend selection, running without the
native extension, and torch.compile tracing through the ops (fake implementations)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sam_kernels
from sam_kernels import backends, ops
from sam_kernels.ops import extension as _ext


def test_ops_are_registered_with_mutation_annotations():
    assert _ext.loaded(), f"native extension failed to load: {_ext.load_error()}"
    schema = str(torch.ops.sam_kernels.perturb_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor(b!)[] x_old" in schema
    assert "Tensor(a!)[] params" in str(torch.ops.sam_kernels.restore_sgd_.default._schema)
    assert _ext.has_kernel("restore_adam_", "CPU")


def test_the_triton_kernels_run_here():
    """Every backend test is parametrized over backends.available(): were Triton missing (or the
    interpreter not set on a machine without a GPU, conftest.py), its cases would silently vanish
    and the GPU path would go untested. So: it is available, and a kernel of it runs and is right."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert "triton" in backends.available(device), backends.why_unavailable("triton", torch.device(device))
    xs = [torch.full((5,), 3.0, device=device), torch.full((2, 3), 4.0, device=device)]
    norm = ops.global_norm(xs, backend="triton")
    torch.testing.assert_close(norm.cpu(), torch.tensor(float((5 * 9 + 6 * 16) ** 0.5)))


def test_auto_backend_per_device():
    assert backends.resolve("auto", torch.device("cpu")) == "cpu"
    assert backends.resolve("torch", torch.device("cpu")) == "torch"
    if torch.cuda.is_available():  # CUDA C++ where the extension has the kernel, Triton for nuSAM's
        cuda = "cuda" if _ext.has_kernel("perturb_", "CUDA") else "triton"
        assert backends.resolve("auto", torch.device("cuda")) == cuda
        assert backends.resolve("auto", torch.device("cuda"), "power_iteration_") == "triton"


def test_explicit_unavailable_backend_says_why():
    with pytest.raises(sam_kernels.BackendUnavailableError, match="runs on CUDA tensors, got cpu"):
        ops.global_norm([torch.ones(3)], backend="cuda")


def test_without_the_extension_the_package_still_works():
    """SAM_KERNELS_DISABLE_EXT=1 stands for a failed build: one warning naming what is missing,
    the torch path for CPU tensors, and a clear error when 'cpu' is asked for."""
    code = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import sam_kernels
            import sam_kernels.ops
        msgs = [str(x.message) for x in w if "native extension" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "SAM_KERNELS_DISABLE_EXT" in msgs[0] and "'cpu' and 'cuda' backends are unavailable" in msgs[0]
        assert sam_kernels.backends.resolve("auto", torch.device("cpu")) == "torch"
        m = torch.nn.Linear(4, 2)
        for base, kw in ((torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})):
            opt = sam_kernels.SAM(m.parameters(), base, lr=0.1, **kw)
            for _ in range(2):  # the second step's plan key reads the state the first made
                m(torch.randn(3, 4)).sum().backward()
                opt.step(lambda: m(torch.randn(3, 4)).sum().backward())
        try:
            sam_kernels.SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend="cpu")
        except sam_kernels.BackendUnavailableError as e:
            assert "native extension is not loaded" in str(e)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("OK")
    """)
    env = dict(os.environ, SAM_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")


def test_torch_compile_traces_through_the_ops_without_graph_breaks():
    params = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn_like(p) for p in params]
    x_old = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]

    def sam_update(params, grads, x_old, bufs):
        norm = torch.ops.sam_kernels.global_norm(grads, [], 0.0)
        torch.ops.sam_kernels.perturb_(params, grads, x_old, norm, 0.05, False, 0.0)
        torch.ops.sam_kernels.restore_sgd_(params, x_old, grads, bufs, 0.1, 0.9, 0.0, False, 0.0, False, False)
        return norm

    eager = [p.clone() for p in params], [b.clone() for b in bufs]
    n_eager = sam_update(eager[0], grads, [torch.empty_like(p) for p in params], eager[1])
    compiled = torch.compile(sam_update, backend="aot_eager", fullgraph=True)
    n_comp = compiled(params, grads, x_old, bufs)
    assert torch.equal(n_eager, n_comp)
    for a, b in zip(params + bufs, eager[0] + eager[1]):
        assert torch.equal(a, b)


def test_an_install_without_the_extension_builds_it_on_first_use_or_says_so_plainly():
    """A build-isolated `pip install .` has no _C (.ci/install_check.sh installs that way and
    builds it on first use): here the import of _C is refused; with SAM_KERNELS_NO_JIT=1 the one
    warning says it was not built (not torch's "circular import"), and how to get it."""
    code = textwrap.dedent("""
        import sys, warnings
        class NoExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "sam_kernels._C":
                    raise ModuleNotFoundError("No module named 'sam_kernels._C'")
        sys.meta_path.insert(0, NoExtension())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import sam_kernels
        msgs = [str(x.message) for x in w if "native extension" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "not built at install time" in msgs[0] and "circular" not in msgs[0], msgs[0]
        assert "python -m sam_kernels.info" in msgs[0]
        print("OK")
    """)
    env = dict(os.environ, SAM_KERNELS_NO_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")


def test_the_build_on_first_use_compiles_the_shipped_sources_into_a_versioned_cache(tmp_path, monkeypatch):
    from sam_kernels.ops import extension

    monkeypatch.setenv("SAM_KERNELS_CACHE", str(tmp_path))
    plan = extension.jit_plan()
    names = {os.path.relpath(s, extension.sources_root()) for s in plan["sources"]}
    assert {"sam_kernels.cpp", "ops.cpp", "table.cpp", os.path.join("cpu", "perturb.cpp")} <= names
    assert plan["with_cuda"] == (torch.version.cuda is not None and plan["with_cuda"])
    assert not any(s.endswith(".cu") for s in plan["sources"]) or plan["with_cuda"]
    assert plan["build_directory"].startswith(str(tmp_path)) and torch.__version__ in plan["build_directory"]
    assert extension.jit_plan() == plan  # the same sources, the same cache
