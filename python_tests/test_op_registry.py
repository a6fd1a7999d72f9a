"""Every public op of the torch.ops.sam_kernels library (csrc/sam_kernels.cpp) against torch's
own checks: torch.library.opcheck (the schema's mutation annotations, the fake kernel of
sam_kernels/ops/extension.py, autograd registration, AOT dispatch) and a torch.compile(fullgraph=True)
trace that must give what the eager op gives. The private _table / _launch are for eager step
plans only (their table hides what a launch writes) and are not traceable by design."""
from __future__ import annotations

import copy
import pathlib

import pytest
import torch

import sam_kernels.ops  # noqa: F401  (loads the library and its fake kernels)
from sam_kernels.ops import codegen, primitives
from sam_kernels.ops.primitives import OPERATORS

SHAPES = [(5,), (3, 4)]
MATS = [(3, 4), (2, 6)]


def _t(shapes=SHAPES, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def _vec(n, value, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).abs() + value for _ in range(1)][0]


def _sgd():
    return [0.1, 0.9, 0.0, False, 1e-2, False, False]  # lr, momentum, dampening, nesterov, wd, maximize, init


def _adam_state(shapes=SHAPES):
    return [_t(shapes, 0.1, 5), [t.abs() for t in _t(shapes, 0.01, 6)], [t.abs() for t in _t(shapes, 0.01, 7)],
            [torch.tensor(3.0) for _ in shapes]]


def _adam():
    return [1e-3, 0.9, 0.999, 1e-8, 1e-2, True, True, False]  # lr, b1, b2, eps, wd, decoupled, amsgrad, maximize


def _rank1():
    us = [torch.nn.functional.normalize(torch.randn(m[0]), dim=0) for m in MATS]
    vs = [torch.nn.functional.normalize(torch.randn(m[1]), dim=0) for m in MATS]
    return us, vs, torch.tensor([0.05, 0.02])


def _flag(v):
    return torch.tensor(float(v))


SAMPLES = {
    "global_norm": lambda: [_t(), _t(seed=1), 0.1],
    "check_grads_": lambda: [_t(), _t(seed=1), 0.3, torch.zeros(4), torch.tensor([1.0, 2.0]), torch.tensor(64.0),
                             _flag(0), 0.5, torch.zeros(2), torch.tensor([1.0, 0.0])],
    "perturb_": lambda: [_t(), _t(seed=1), [torch.empty(s) for s in SHAPES], torch.tensor(2.0), 0.05, True, 0.1],
    "shift_": lambda: [_t(), _t(seed=1), torch.tensor(2.0), 0.05, True],
    "lincomb_": lambda: [_t(), _t(seed=1), _t(seed=2), torch.tensor(0.5), torch.tensor(-2.0)],
    "restore_": lambda: [_t(), _t(seed=1), _flag(0)],
    "restore_sgd_": lambda: [_t(), _t(seed=1), _t(seed=2), _t(seed=3), *_sgd(), torch.tensor(0.5), _flag(0)],
    "restore_adam_": lambda: [_t(), _t(seed=1), _t(seed=2), *_adam_state(), *_adam(), torch.tensor(0.5), _flag(0)],
    "shift_restore_sgd_": lambda: [_t(), _t(seed=1), _t(seed=2), torch.tensor(2.0), 0.05, *_sgd(), torch.tensor(0.5),
                                   _flag(0)],
    "shift_restore_adam_": lambda: [_t(), _t(seed=1), *_adam_state(), torch.tensor(2.0), 0.05, *_adam(),
                                    torch.tensor(0.5), _flag(0)],
    "sampa_preview_sgd_": lambda: [_t(), _t(seed=1), [torch.empty(s) for s in SHAPES],
                                   [torch.empty(s) for s in SHAPES], _t(seed=3), torch.tensor(2.0), 0.05, *_sgd()],
    "sampa_preview_adam_": lambda: [_t(), _t(seed=1), [torch.empty(s) for s in SHAPES],
                                    [torch.empty(s) for s in SHAPES], *_adam_state(), torch.tensor(2.0), 0.05,
                                    *_adam()],
    "sampa_update_sgd_": lambda: [_t(), _t(seed=1), _t(seed=2), _t(seed=3), 0.3, *_sgd(), torch.tensor(0.5),
                                  _flag(0)],
    "sampa_update_adam_": lambda: [_t(), _t(seed=1), _t(seed=2), *_adam_state(), 0.3, *_adam(), torch.tensor(0.5),
                                   _flag(0)],
    "power_iteration_": lambda: [_t(MATS), [torch.nn.functional.normalize(torch.randn(m[0]), dim=0) for m in MATS],
                                 [torch.empty(m[1]) for m in MATS], torch.empty(2), 2, 1e-12],
    "rank1_scales_": lambda: [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.1, 0.1, 0.0]),
                              torch.tensor([1.0, 1.0, 0.0]), torch.empty(3), torch.empty(())],
    "rank1_update_": lambda: [_t(MATS), *_rank1()],
    "rank1_restore_sgd_": lambda: [_t(MATS), *_rank1(), _t(MATS, seed=2), _t(MATS, seed=3), *_sgd(),
                                   torch.tensor(0.5), _flag(0)],
    "rank1_restore_adam_": lambda: [_t(MATS), *_rank1(), _t(MATS, seed=2), *_adam_state(MATS), *_adam(),
                                    torch.tensor(0.5), _flag(0)],
}
PRIVATE = {"_table", "_launch"}


def registered_ops() -> set:
    """The op names the C++ library defines (csrc/sam_kernels.cpp registers every declaration's schema)."""
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("sam_kernels::")}


def test_every_public_op_is_declared_and_sampled():
    assert registered_ops() - PRIVATE == {p.name for p in OPERATORS} == set(SAMPLES)


@pytest.mark.parametrize("prim", OPERATORS, ids=lambda p: p.name)
def test_registered_schema_is_the_declaration(prim):
    """What C++ registered (from csrc/generated/primitives.h) is what primitives.py declares, and
    the parsed declaration says the same arguments, mutations and defaults as torch's parse of it."""
    schema = getattr(torch.ops.sam_kernels, prim.name).default._schema
    assert str(schema) == "sam_kernels::" + prim.schema
    assert [a.name for a in schema.arguments] == [p.name for p in prim.params]
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == \
        list(prim.mutated)


def test_generated_header_is_current():
    """csrc/generated/primitives.h is what ops/codegen.py writes from the declarations (setup.py
    writes it before every build; a stale committed copy would show here)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    assert codegen.write(str(root), check=True), "run: python -m sam_kernels.ops.codegen"


def test_declarations_are_checked():
    """A declaration that cannot be what it says is refused where it is written."""
    with pytest.raises(ValueError, match="cannot read argument"):
        primitives.parse("bad_(Tensor[] params, complex z) -> ()")
    with pytest.raises(ValueError, match="presence rule"):
        primitives.declare("bad_(Tensor(a!)[] params, Tensor[] bufs) -> ()", "", present={"bufs": ("momentum",)})
    with pytest.raises(ValueError, match="kind"):
        primitives.declare("bad_(Tensor(a!)[] params, Tensor[] us) -> ()", "", kinds={"us": "matrices"})
    primitives.REGISTRY.pop("bad_", None)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    op = getattr(torch.ops.sam_kernels, name).default
    torch.library.opcheck(op, SAMPLES[name]())


def _tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_compiles_without_graph_breaks(name):
    """torch.compile(fullgraph=True) traces the op (its fake kernel and mutations) and gives what
    eager gives, outputs and every argument it writes, bit for bit."""
    torch._dynamo.reset()
    op = getattr(torch.ops.sam_kernels, name)
    args = SAMPLES[name]()
    eager_args, compiled_args = copy.deepcopy(args), copy.deepcopy(args)

    def call(*a):
        return op(*a)

    out = call(*eager_args)
    got = torch.compile(call, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip(_tensors([out, eager_args]), _tensors([got, compiled_args])):
        assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.isnan(), b.isnan()))
