"""A cache is a promise: a step plan built once may be reused only while everything it baked in
is unchanged (sam_kernels/engine/plans.py; the keys of engine.StepEngine.key). The test of that promise:
at random points of a random sequence of what users do between steps, a fresh optimizer built
from the warm one's state_dict() on a copy of the model takes the next step, and the two steps
are the same bit for bit (weights, base state, our extra state), for every class, every backend
that runs here, SGD and AdamW, capturable or not.

What users do between steps (hypothesis rules): step (the two-step API or step(closure) under
torch's closure convention), read the base state through torch's defaultdict, create a state entry
or replace one with a copy, change an option (lr, rho, momentum, dampening, nesterov, weight
decay, betas, eps, amsgrad, adaptive, normalized, perturb, lam), change max_grad_norm, add a param group,
freeze a parameter (no gradient from then on) or unfreeze it, load the optimizer's own state dict,
raise an exception inside a pass. Each rule is followed by a compared step; the sequences are
short (make test stays fast)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import backend_cases
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from optim_db import BASE_OPTIONS, BASES, BY_NAME, gradient_before_first_step, make
from torch import nn


class Raised(Exception):
    """What a flaky loss raises inside a pass."""


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3))


def cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class FlakyLoss:
    """loss_fn(model, batch) that raises at its `fail_at`-th call from now (module level: copies
    and pickles of a SAMPa hold it)."""

    def __init__(self):
        self.fail_at = None

    def __call__(self, model, batch):
        if self.fail_at is not None:
            self.fail_at -= 1
            if self.fail_at == 0:
                self.fail_at = None
                raise Raised("loss_fn failed")
        return cross_entropy(model, batch)


def snapshot(model, opt) -> tuple:
    """What a step leaves: the weights, the base state, our extra state (state_dict's "sam")."""
    sd = copy.deepcopy(opt.state_dict())
    ours = sd["param_groups"][0].pop("sam")
    return [p.detach().clone() for p in model.parameters()], sd["state"], sd["param_groups"], ours


def assert_same(a, b, what):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), \
            f"{what}: differ by {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


class WarmEqualsFresh(RuleBasedStateMachine):
    name, base, backend, device, capturable, clip = "sam", "sgd", "cpu", "cpu", False, None

    @initialize()
    def setup(self):
        self.model = make_model().to(self.device)
        self.loss = FlakyLoss()
        self.gen = torch.Generator().manual_seed(1)
        self.grouped = False
        base_cls, kw = BASES[self.base]
        self.opt = self._build(self.model, [["0.weight", "0.bias", "2.weight", "2.bias"]],
                               [dict(kw)], self.clip)
        self._step(self.model, self.opt, self._batch(), "two_step")  # the plans are built

    # --- building, and taking a step ----------------------------------------------------------

    def _build(self, model, groups, options, clip):
        """An optimizer of this machine's class over `model`: groups are parameter names (each
        group's options are what a checkpoint then loads)."""
        base_cls, kw = BASES[self.base]
        named = dict(model.named_parameters())
        param_groups = [{"params": [named[n] for n in names], **opts} for names, opts in zip(groups, options)]
        common = dict(backend=self.backend, max_grad_norm=clip, capturable=self.capturable)
        if self.name == "sampa":
            return make("sampa", model, base_cls(param_groups, **kw), loss_fn=self.loss, **common)
        return make(self.name, param_groups, base_cls, **kw, **common)

    def _fresh(self):
        """A copy of the model (its gradients too) and an optimizer built anew on it from the warm
        one's state_dict()."""
        model = copy.deepcopy(self.model)
        for p, q in zip(self.model.parameters(), model.parameters()):  # deepcopy leaves .grad behind
            q.grad = None if p.grad is None else p.grad.clone()
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in self.opt.param_groups]
        opt = self._build(model, groups, [{} for _ in groups], self.opt.max_grad_norm)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        return model, opt

    def _batch(self):
        x = torch.randn(6, 4, generator=self.gen).to(self.device)
        return x, torch.randint(0, 3, (6,), generator=self.gen).to(self.device)

    def _step(self, model, opt, batch, api):
        if self.name == "sampa":
            return opt.step(batch)
        if api == "closure":  # torch's closure convention: the closure zeroes and computes the gradient
            def closure():
                opt.zero_grad()
                loss = self.loss(model, batch)
                loss.backward()
                return loss
            return opt.step(closure)
        opt.zero_grad()
        if gradient_before_first_step(opt):  # (MSAM moves first, then takes its one gradient)
            self.loss(model, batch).backward()
        if not opt.sam_step_due:
            return opt.base_step(zero_grad=True)
        opt.first_step(zero_grad=True)
        try:
            self.loss(model, batch).backward()
        except Raised:
            opt.restore()
            raise
        opt.second_step(zero_grad=True)

    # --- rules --------------------------------------------------------------------------------

    def _compared_step(self, api):
        """The warm optimizer steps, and so does a fresh one built from its state_dict() on a copy
        of the model: the two steps are the same bit for bit."""
        batch = self._batch()
        model, opt = self._fresh()
        assert_same(snapshot(model, opt), snapshot(self.model, self.opt), "the fresh optimizer before the step")
        self._step(self.model, self.opt, batch, api)
        self._step(model, opt, batch, api)
        assert_same(snapshot(model, opt), snapshot(self.model, self.opt), "after the step, fresh vs warm")

    # each rule is what a user does between two steps, then the next step (compared)
    APIS = st.sampled_from(["two_step", "closure"])

    @rule(api=APIS)
    def step(self, api):
        self._compared_step(api)

    @rule(at=st.integers(1, 3), api=APIS)
    def raise_inside_a_pass(self, at, api):
        self.loss.fail_at = at
        try:
            self._step(self.model, self.opt, self._batch(), api)
        except Raised:
            pass
        self.loss.fail_at = None
        self._compared_step(api)

    @rule(api=APIS)
    def read_the_base_state(self, api):
        """What a logger does: torch's defaultdict makes an (empty) entry for each parameter."""
        for g in self.opt.param_groups:
            for p in g["params"]:
                self.opt.base_optimizer.state[p].get("momentum_buffer")
        self._compared_step(api)

    @rule(which=st.integers(0, 5), replace=st.booleans(), api=APIS)
    def create_or_replace_a_state_entry(self, which, replace, api):
        """A state entry created by hand (as torch's first step would: zeros), or an existing state
        tensor replaced by a copy of it (new storage, the same values)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        p = params[which % len(params)]
        st_ = self.opt.base_optimizer.state[p]
        group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
        if replace:
            for k, v in list(st_.items()):
                if torch.is_tensor(v) and v.dim() > 0:
                    st_[k] = v.clone()
        elif self.base == "sgd" and group["momentum"] != 0 and st_.get("momentum_buffer") is None:
            st_["momentum_buffer"] = torch.zeros_like(p)
        self._compared_step(api)

    @rule(data=st.data(), api=APIS)
    def change_an_option(self, data, api):
        group = data.draw(st.sampled_from(self.opt.param_groups))
        common = st.sampled_from(BASE_OPTIONS["any"] + BASE_OPTIONS[self.base])
        own = BY_NAME[self.name].options  # what a class keys its plans on: half the draws
        key, values = data.draw(st.one_of(common, st.sampled_from(own)) if own else common)
        value = data.draw(st.sampled_from(values))
        nesterov_ok = {"nesterov": lambda: not value or (group["momentum"] != 0 and group["dampening"] == 0),
                       "momentum": lambda: value != 0 or not (group["nesterov"] or self.name == "msam"),
                       "dampening": lambda: value == 0 or not group["nesterov"]}
        if nesterov_ok.get(key, lambda: True)():  # torch's SGD: nesterov needs momentum and no dampening
            group[key] = value
        self._compared_step(api)

    @rule(clip=st.sampled_from([None, 0.05]), api=APIS)  # small: it clips every step
    def change_max_grad_norm(self, clip, api):
        self.opt.max_grad_norm = clip
        self._compared_step(api)

    @precondition(lambda self: not self.grouped)
    @rule(api=APIS)
    def add_a_param_group(self, api):
        self.opt.add_param_group({"params": list(self.model[4].parameters())})
        self.grouped = True
        self._compared_step(api)

    @precondition(lambda self: self.name != "sampa")  # SAMPa differentiates every parameter it has
    @rule(which=st.sampled_from(["0.bias", "2.weight"]), frozen=st.booleans(), api=APIS)
    def freeze_or_unfreeze(self, which, frozen, api):
        p = dict(self.model.named_parameters())[which]
        p.requires_grad_(not frozen)
        p.grad = None
        self._compared_step(api)

    @rule(api=APIS)
    def load_its_own_state_dict(self, api):
        self.opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        self._compared_step(api)


def machine(name, base, backend, device, capturable=False, clip=None, examples=4, steps=8):
    cls = type(f"WarmEqualsFresh_{name}_{base}_{backend}", (WarmEqualsFresh,),
               dict(name=name, base=base, backend=backend, device=device, capturable=capturable, clip=clip))
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                     derandomize=True, suppress_health_check=list(HealthCheck))
    return cls.TestCase


# every class on every backend that runs here; the base optimizer, capturable and clipping alternate
# (the kernels' own tests cover their combinations: these sequences test what the plans bake in)
for _i, _case in enumerate(backend_cases("power_iteration_")):
    _backend, _device = _case.values
    for _j, _name in enumerate(BY_NAME):
        _fast = _backend != "triton"  # the interpreter runs each launch in Python
        globals()[f"test_{_name}_{_backend}_{_device}"] = machine(
            _name, ("sgd", "adamw")[(_i + _j) % 2], _backend, _device, capturable=(_i + _j) % 3 == 0,
            clip=0.05 if (_i + _j // 2) % 2 else None,
            examples=12 if _fast else 2, steps=10 if _fast else 6)
del _i, _case, _backend, _device, _j, _name, _fast


def test_python_fingerprints_equal_the_extensions():
    """The plans' keys without the extension (ops/extension.py's Python loops) are the C loops'
    (csrc/sam_kernels.cpp): same addresses, flags and absent / non-tensor markers."""
    import struct

    from sam_kernels.ops import extension as ext
    if not ext.loaded():
        pytest.skip("the native extension is not built")
    ints = lambda b: struct.unpack(f"{len(b) // 8}q", b)  # noqa: E731  (the C loops' packed int64s)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2, 6).t())]
    params[0].grad = torch.randn(4, 3).t()  # not contiguous
    params[2].grad = torch.randn(6, 2)
    structure, grads = ext._fingerprint_py(params)
    c_structure, c_grads = ext._C.fingerprint(params)
    assert [v for pair in structure for v in pair] == list(ints(c_structure)) and grads == ints(c_grads)
    state = {params[0]: {"momentum_buffer": torch.zeros(3, 4), "step": 3.0}, params[2]: {"exp_avg": None}}
    keys = ("momentum_buffer", "step", "exp_avg")
    assert ext._state_fingerprint_py(state, params, keys) == ints(ext._C.state_fingerprint(state, params, keys))
    assert set(state) == {params[0], params[2]}  # no entry created
