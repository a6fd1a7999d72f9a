"""Every primitive of sam_kernels, declared once.

A declaration is the operator's schema (torch's syntax: the tensor lists it reads and writes, its
named float scalars and bool / int options, its device tensors, in one order) plus what the
schema cannot say: which optional lists are present when (bufs only with momentum), what kind of
tensors a list holds, the per-tensor integer columns computed from the first list, and which
scalars a capturable step gives as device scalars. From the declarations come:

    the schemas registered in C++, and the enums by which every C++ and CUDA kernel reads its
        lists, scalars, options and device tensors by name (csrc/generated/primitives.h,
        written by ops/codegen.py when the extension is built; a test checks it is current)
    the generic C++ entry of the list ops (csrc/ops.cpp: one boxed function for all of them)
    the fake kernels for torch.compile (ops/extension.py)
    the public list ops with their checks (ops/__init__.py) and the native packing (ops/native.py)

A new fused primitive touches its declaration here, one kernel per backend (csrc/cpu, csrc/cuda,
ops/triton, ops/reference.py) and its test. Pure Python (setup.py imports it to write the header).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# What the tensors of a list are: like params[i]; one fp32 value each; fp32 vectors of any length.
LIST_KINDS = ("elements", "scalars", "vectors")
# What a device tensor is: one fp32 value; one fp32 or fp64 value (a norm); an fp32 vector (checked
# with its lists: nuSAM's scales); anything (an entry of its own checks it).
TENSOR_KINDS = ("scalar", "norm", "vector", "any")


@dataclass(frozen=True)
class Param:
    """One argument of a schema."""
    name: str
    type: str  # "Tensor[]", "Tensor", "Tensor?", "float", "bool", "int"
    written: bool = False
    default: str | None = None
    kind: str = ""  # LIST_KINDS for a list, TENSOR_KINDS for a device tensor

    @property
    def category(self) -> str:
        """list | tensor | scalar (a float the kernel reads) | option (a bool or int)."""
        if self.type == "Tensor[]":
            return "list"
        if self.type.startswith("Tensor"):
            return "tensor"
        return "scalar" if self.type == "float" else "option"


@dataclass(frozen=True)
class Primitive:
    name: str
    schema: str
    params: tuple[Param, ...]
    returns: str
    doc: str
    present: dict = field(default_factory=dict)  # list -> (option, ...) that must all hold ("!x": x false)
    values: tuple[str, ...] = ()  # per-tensor int columns of the table, computed from the first list
    device_scalars: tuple[str, ...] = ()  # scalars a capturable step gives as fp32 device scalars
    entry: str = "generic"  # "generic": csrc/ops.cpp's boxed list op; "custom": an entry of its own
    internal: bool = False  # a kernel only the step plans launch (no operator)
    cuda: bool = True  # has a CUDA C++ kernel (False: its GPU path is Triton)
    checks: tuple[str, ...] = ()  # checks beyond the kinds: "rank1" (the vectors fit the matrices)

    def of(self, category: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.category == category)

    @property
    def lists(self) -> tuple[Param, ...]:
        return self.of("list")

    @property
    def scalars(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.of("scalar"))

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.of("option"))

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.of("tensor"))

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.written)

    def is_present(self, name: str, values: dict, unknown: bool = False) -> bool:
        """Whether optional list `name` is present, given the values of (some of) the scalars and
        options; a condition on a value not given counts as `unknown`."""
        for c in self.present.get(name, ()):
            key = c.lstrip("!")
            holds = unknown if key not in values else bool(values[key]) != c.startswith("!")
            if not holds:
                return False
        return True


_ARG = re.compile(r"^(?P<type>Tensor(?:\((?P<alias>[a-z])(?P<bang>!)?\))?(?:\[\]|\?)?|float|bool|int)\s+"
                  r"(?P<name>\w+)(?:=(?P<default>\S+))?$")


def parse(schema: str) -> tuple[str, tuple[Param, ...], str]:
    """(name, params, returns) of a schema in torch's syntax (the subset the primitives use)."""
    m = re.match(r"^(\w+)\((.*)\)\s*->\s*(.+)$", schema)
    if m is None:
        raise ValueError(f"not a schema: {schema!r}")
    params = []
    for arg in filter(None, (a.strip() for a in m.group(2).split(","))):
        a = _ARG.match(arg)
        if a is None:
            raise ValueError(f"{m.group(1)}: cannot read argument {arg!r}")
        kind = re.sub(r"\([a-z]!?\)", "", a.group("type"))
        params.append(Param(a.group("name"), kind, written=bool(a.group("bang")), default=a.group("default")))
    return m.group(1), tuple(params), m.group(3).strip()


REGISTRY: dict[str, Primitive] = {}


def declare(schema: str, doc: str, *, kinds: dict | None = None, present: dict | None = None, values=(),
            device_scalars=(), entry: str = "generic", internal: bool = False, cuda: bool = True,
            checks=()) -> Primitive:
    name, params, returns = parse(schema)
    kinds = kinds or {}
    params = tuple(Param(p.name, p.type, p.written, p.default,
                         kinds.get(p.name, {"list": "elements", "tensor": "scalar"}.get(p.category, "")))
                   for p in params)
    for q in params:
        if q.category in ("list", "tensor") and q.kind not in (LIST_KINDS if q.category == "list" else TENSOR_KINDS):
            raise ValueError(f"{name}: {q.name} cannot be of kind {q.kind!r}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: argument names repeat")
    for lst, conditions in (present or {}).items():
        if lst not in names or any(c.lstrip("!") not in names for c in conditions):
            raise ValueError(f"{name}: presence rule of {lst!r} names an unknown argument")
    prim = Primitive(name, schema, params, returns, doc, dict(present or {}), tuple(values), tuple(device_scalars),
                     entry, internal, cuda, tuple(checks))
    REGISTRY[name] = prim
    return prim


_GUARD = "Tensor? grad_scale=None, Tensor? found_inf=None"
_SGD = "float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, bool init_bufs"
_ADAM = ("float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, "
         "bool maximize")
_ADAM_STATE = ("Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
               "Tensor[] state_steps")
_ADAM_KINDS = {"state_steps": "scalars"}
_RANK1_KINDS = {"us": "vectors", "vs": "vectors", "scales": "vector"}
_SGD_PRESENT = {"bufs": ("momentum",)}
_ADAM_PRESENT = {"max_exp_avg_sqs": ("amsgrad",)}

# --- norms and the guard (composite list ops: sums of squares, then a finalize) --------------

GLOBAL_NORM = declare(
    "global_norm(Tensor[] tensors, Tensor[] weights, float offset) -> Tensor",
    "sqrt(sum_i ||w_i * t_i||^2) with w_i = |weights_i| + offset (or 1 when weights is empty); fp32, "
    "fp64 for fp64 tensors.", entry="custom")
CHECK_GRADS = declare(
    "check_grads_(Tensor[] grads, Tensor[] grads2, float lam, Tensor(a!) flags, Tensor? first_norm, Tensor? scale, "
    "Tensor? found_inf, float max_norm, Tensor(b!)? steps, Tensor? steps_mask) -> ()",
    "The guard of a step. n = ||grads|| (of (1 - lam) grads + lam grads2 when grads2 is given); flags "
    "(fp32[4]) <- [found_inf, grad_scale, grad_norm, skipped + found_inf] with found_inf = n, first_norm (any "
    "element) not finite or found_inf != 0, grad_scale = inv * min(1, max_norm / (n inv + 1e-6)) with inv = "
    "1 / scale (1 without one), grad_norm = n inv; steps += (1 - found_inf) * steps_mask (Adam's step "
    "counters, advanced only when the step is taken).", entry="custom",
    kinds={"flags": "any", "first_norm": "any", "steps": "any", "steps_mask": "any"})
SUMSQ = declare(
    "sumsq(Tensor[] tensors, Tensor[] second, float scalar, int mode, int first, Tensor(a!) partials) -> ()",
    "Each chunk's sum of squares into partials[first + chunk] (fp32; fp64 partials for fp64 norms): of "
    "tensors (mode 0), of (|second| + scalar) tensors (1, ASAM), of (1 - scalar) tensors + scalar second "
    "(2, SAMPa); mode 3: the sum of tensors * second instead (a dot product: GSAM, LookSAM).",
    internal=True, present={"second": ("mode",)}, kinds={"partials": "any"})
NORM_FINALIZE = declare(
    "norm_finalize(Tensor partials, Tensor(a!) out) -> ()",
    "out <- sqrt(sum(partials)), added in a fixed order.", internal=True, kinds={"partials": "any", "out": "any"})
GUARD_FINALIZE = declare(
    "guard_finalize(Tensor partials, Tensor(a!) flags, Tensor? first_norm, Tensor? scale, Tensor? found_inf, "
    "float max_norm, Tensor(b!)? steps, Tensor? steps_mask) -> ()",
    "check_grads_'s guard from the sums of squares in partials.", internal=True,
    kinds={"partials": "any", "flags": "any", "first_norm": "any", "steps": "any", "steps_mask": "any"})

# --- SAM ---------------------------------------------------------------------------------

PERTURB = declare(
    "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] x_old, Tensor norm, float rho, bool adaptive, "
    "float offset) -> ()",
    "x_old <- params; params <- params + s * w^2 * grads, s = rho / (norm + 1e-12) (w = |params| + offset "
    "for ASAM, else 1), and params untouched when norm is not finite.", kinds={"norm": "norm"},
    device_scalars=("rho",))
SHIFT = declare(
    "shift_(Tensor(a!)[] params, Tensor[] directions, Tensor norm, float rho, bool subtract) -> ()",
    "params <- params + s * directions (subtract: - s * directions), s = rho / (norm + 1e-12), and params "
    "untouched when norm is not finite: MSAM's move along its momentum buffers and back, with no copy.",
    kinds={"norm": "norm"}, device_scalars=("rho",))
LINCOMB = declare(
    "lincomb_(Tensor(a!)[] out, Tensor[] x, Tensor[] y, Tensor a, Tensor b) -> ()",
    "out <- a * x + b * y elementwise (a, b fp32 device scalars, computed on the device from norms and dot "
    "products; out may be x or y): GSAM's d = g_p - alpha g_perp, LookSAM's g_v and its reused direction, "
    "F-SAM's g - sigma m and its EMA (fp64 coefficients for fp64 tensors).", kinds={"a": "norm", "b": "norm"})
RESTORE = declare(
    "restore_(Tensor(a!)[] params, Tensor[] x_old, Tensor? found_inf=None) -> ()",
    "params <- x_old, bit for bit; with found_inf, only when found_inf == 0 (a conditional commit).")
RESTORE_SGD = declare(
    f"restore_sgd_(Tensor(a!)[] params, Tensor[] x_old, Tensor[] grads, Tensor(b!)[] bufs, {_SGD}, {_GUARD}) -> ()",
    "params <- x_old, then one torch.optim.SGD step with grads * grad_scale; bufs: the momentum buffers. "
    "found_inf != 0: params <- x_old only.", present=_SGD_PRESENT, device_scalars=("lr",))
RESTORE_ADAM = declare(
    f"restore_adam_(Tensor(a!)[] params, Tensor[] x_old, Tensor[] grads, {_ADAM_STATE}, {_ADAM}, {_GUARD}) -> ()",
    "params <- x_old, then one torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step with grads * "
    "grad_scale; state_steps: each tensor's step count for this update (fp32 device scalars). found_inf != 0: "
    "params <- x_old only.", kinds=_ADAM_KINDS, present=_ADAM_PRESENT, device_scalars=("lr",))

# --- MSAM (the move along the momentum taken out inside the update: no pass of its own) ------

SHIFT_RESTORE_SGD = declare(
    f"shift_restore_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor norm, float rho, {_SGD}, "
    f"{_GUARD}) -> ()",
    "params <- params + s * bufs (s = rho / (norm + 1e-12), rounded to the params' dtype as shift_ rounds it; "
    "no move for a non-finite norm), then restore_sgd_'s SGD step from there, in one pass: MSAM's way back "
    "along the momentum buffers it moved along (read once, before the step writes them; bufs are always "
    "given). found_inf != 0: the move back only.", kinds={"norm": "norm"}, device_scalars=("rho", "lr"))
SHIFT_RESTORE_ADAM = declare(
    f"shift_restore_adam_(Tensor(a!)[] params, Tensor[] grads, {_ADAM_STATE}, Tensor norm, float rho, {_ADAM}, "
    f"{_GUARD}) -> ()",
    "params <- params + s * exp_avgs (s as for shift_restore_sgd_), then restore_adam_'s Adam / AdamW step "
    "from there, in one pass. found_inf != 0: the move back only.",
    kinds={**_ADAM_KINDS, "norm": "norm"}, present=_ADAM_PRESENT, device_scalars=("rho", "lr"))

# --- SAMPa -------------------------------------------------------------------------------

SAMPA_PREVIEW_SGD = declare(
    "sampa_preview_sgd_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
    f"Tensor[] bufs, Tensor norm, float rho, {_SGD}) -> ()",
    "perturbed <- params + s * grads (s = rho / (norm + 1e-12)) and previews <- the SGD step from params "
    "with grads; the state is read only. A non-finite norm stands for a gradient that must not be used: "
    "perturbed <- params and the preview takes a zero gradient.",
    kinds={"norm": "norm"}, present={"bufs": ("momentum", "!init_bufs")}, device_scalars=("rho", "lr"))
SAMPA_PREVIEW_ADAM = declare(
    "sampa_preview_adam_(Tensor[] params, Tensor[] grads, Tensor(a!)[] perturbed, Tensor(b!)[] previews, "
    "Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, Tensor[] state_steps, Tensor norm, "
    f"float rho, {_ADAM}) -> ()",
    "The preview of an Adam / AdamW step (state_steps are the counts before it: it previews count + 1).",
    kinds={**_ADAM_KINDS, "norm": "norm"}, present=_ADAM_PRESENT, device_scalars=("rho", "lr"))
SAMPA_UPDATE_SGD = declare(
    f"sampa_update_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, Tensor(b!)[] bufs, float lam, {_SGD}, "
    f"{_GUARD}) -> ()",
    "The SGD step from params with d = (1 - lam) * grads + lam * grads2, in one pass.", present=_SGD_PRESENT,
    device_scalars=("lr",))
SAMPA_UPDATE_ADAM = declare(
    f"sampa_update_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor[] grads2, {_ADAM_STATE}, float lam, {_ADAM}, "
    f"{_GUARD}) -> ()",
    "The Adam / AdamW step from params with d = (1 - lam) * grads + lam * grads2, in one pass.",
    kinds=_ADAM_KINDS, present=_ADAM_PRESENT, device_scalars=("lr",))

# --- nuSAM (rank-1 perturbations of weight matrices; us / vs fp32 vectors) ------------------

POWER_ITERATION = declare(
    "power_iteration_(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor(c!) sigmas, int iters, float tau) "
    "-> ()",
    "T power iterations warm-started from us: v = G^T u / (|G^T u| + tau), u = G v / (|G v| + tau); sigmas the "
    "top singular values.", entry="custom", kinds={**_RANK1_KINDS, "sigmas": "any"}, cuda=False)
POWER_ITERATION_KERNEL = declare(
    "power_iteration(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, Tensor[] warm, int iters, float tau, "
    "Tensor(c!) sigmas) -> ()",
    "The kernel of power_iteration_ and of the step plans, from the warm starts `warm` into us, vs.",
    internal=True, kinds={**_RANK1_KINDS, "warm": "vectors", "sigmas": "any"}, values=("nrows", "ncols", "index"),
    cuda=False)
RANK1_SCALES = declare(
    "rank1_scales_(Tensor sigmas, Tensor rho, Tensor normalized, Tensor(a!) scales, Tensor(b!) first_norm) -> ()",
    "nuSAM's scales (fp32 vectors of k): scales_i = every sigma finite ? (normalized_i != 0 ? rho_i sigma_i / "
    "(sqrt(sum of the normalized sigma_j^2) + 1e-12) : rho_i) : 0; first_norm = sum of the sigmas (not finite iff "
    "one is not).", entry="custom", cuda=False,
    kinds={"sigmas": "any", "rho": "any", "normalized": "any", "scales": "any", "first_norm": "any"})
RANK1_UPDATE = declare(
    "rank1_update_(Tensor(a!)[] mats, Tensor[] us, Tensor[] vs, Tensor scales) -> ()",
    "M_i <- M_i + scales[i] * u_i v_i^T (scales: fp32 on the device; 0 leaves M_i untouched).",
    kinds=_RANK1_KINDS, values=("ncols", "index"), cuda=False, checks=("rank1",))
RANK1_RESTORE_SGD = declare(
    f"rank1_restore_sgd_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
    f"Tensor(b!)[] bufs, {_SGD}, {_GUARD}) -> ()",
    "M <- M - s u v^T, then restore_sgd_'s SGD step, in one pass (found_inf != 0: the removal only).",
    kinds=_RANK1_KINDS, present=_SGD_PRESENT, values=("ncols", "index"), cuda=False, checks=("rank1",))
RANK1_RESTORE_ADAM = declare(
    f"rank1_restore_adam_(Tensor(a!)[] params, Tensor[] us, Tensor[] vs, Tensor scales, Tensor[] grads, "
    f"{_ADAM_STATE}, {_ADAM}, {_GUARD}) -> ()",
    "M <- M - s u v^T, then restore_adam_'s Adam step, in one pass (found_inf != 0: the removal only).",
    kinds={**_RANK1_KINDS, **_ADAM_KINDS}, present=_ADAM_PRESENT, values=("ncols", "index"), cuda=False,
    checks=("rank1",))

OPERATORS = [p for p in REGISTRY.values() if not p.internal]
