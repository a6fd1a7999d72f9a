"""Compile the multi-tensor Triton kernels for sm_90 without a GPU and print, as JSON, the global
load / store instructions of each: 16-byte accesses are `ld.global.v4.b32` / `st.global.v4.b32`.
Every kernel of the backend is compiled here (the scalar ones too: the guard, the finalize, the
power iteration), so code that only the GPU compiler would reject fails in CI, not on the next
GPU run. Run by test_triton_ptx.py in a process without TRITON_INTERPRET (the interpreter
replaces the compiler)."""
import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_kernels.ops.triton import adam, norm, perturb, power_iteration, rank1, restore, sampa_preview, sgd

KERNELS = {
    "perturb": perturb._perturb_kernel, "sumsq": norm._sumsq_kernel, "restore": restore._restore_kernel,
    "restore_sgd": sgd._restore_sgd_kernel, "restore_adam": adam._restore_adam_kernel,
    "rank1": rank1._rank1_kernel, "preview_sgd": sampa_preview._preview_sgd_kernel,
    "preview_adam": sampa_preview._preview_adam_kernel,
}
# Kernels without element lists: compiled (they must build for sm_90), their accesses not checked.
SCALAR_KERNELS = {
    "finalize": norm._finalize_kernel, "guard": norm._guard_kernel,
    "gemv_t": power_iteration._gemv_t_kernel, "gemv": power_iteration._gemv_kernel,
    "finish": power_iteration._finish_kernel, "scales": power_iteration._scales_kernel,
}
INTS = ("n_tensors", "part0", "n", "n_first_norm", "n_steps", "k")
FP32 = ("rho", "offset", "scalar", "lr", "momentum", "one_minus_dampening", "weight_decay", "lam", "beta1_weight",
        "beta2", "one_minus_beta2", "eps", "decay_factor", "max_norm", "tau")
CONSTS = {"CT": tl.float32, "BLOCK": 4096, "EPS": 1e-12, "U_LIST": 6, "MOMENTUM": True, "HAS_FOUND": True,
          "SCALED": True, "MODE": 0, "BR": 16, "BC": 256, "SEG": 128, "WARM": False}


def instructions(fn, dtype, vec, block=4096):
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = {**CONSTS, "DTYPE": dtype, "VEC": vec, "BLOCK": block}.get(p.name, False)
        elif p.name in INTS:
            sig[p.name] = "i32"
        elif p.name in FP32:
            sig[p.name] = "fp32"
        elif p.name in ("ptrs", "numels", "blk_start", "ncols", "index", "g_ptrs", "u_ptrs", "v_ptrs", "ns", "ms",
                        "it_c", "it_r", "it_s", "pt_start", "pt_count", "pr_start", "pr_count", "sigma_index"):
            sig[p.name] = "*i64"
        elif p.name in ("blk_tensor", "it_t", "it_dim"):
            sig[p.name] = "*i32"
        else:  # the fp32 device scalars and vectors: norms, flags, partials, scales, steps
            sig[p.name] = "*fp32"
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8})
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", kernel.asm["ptx"])))


if __name__ == "__main__":
    out = {}
    for name, fn in KERNELS.items():
        for dtype, label, vec in ((tl.float32, "fp32", 4), (tl.bfloat16, "bf16", 8)):
            out[f"{name}-{label}-vec{vec}"] = instructions(fn, dtype, vec)
    out["perturb-fp32-vec1"] = instructions(perturb._perturb_kernel, tl.float32, 1)
    for name, fn in SCALAR_KERNELS.items():
        out[name] = instructions(fn, tl.float32, 1, block=128)
    for name in ("gemv_t", "gemv"):  # the matrices with 16-byte rows
        out[f"{name}-fp32-vec4"] = instructions(SCALAR_KERNELS[name], tl.float32, 4, block=128)
    print(json.dumps(out))
