"""Compile the multi-tensor Triton kernels for sm_90 without a GPU and print, as JSON, the global
load / store instructions of each: 16-byte accesses are `ld.global.v4.b32` / `st.global.v4.b32`.
Run by test_triton_ptx.py in a process without TRITON_INTERPRET (the interpreter replaces the
compiler)."""
import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_kernels.triton_ops import adam, norm, perturb, rank1, restore, sampa_preview, sgd

KERNELS = {
    "perturb": perturb._perturb_kernel, "sumsq": norm._sumsq_kernel, "restore": restore._restore_kernel,
    "restore_sgd": sgd._restore_sgd_kernel, "restore_adam": adam._restore_adam_kernel,
    "rank1": rank1._rank1_kernel, "preview_sgd": sampa_preview._preview_sgd_kernel,
    "preview_adam": sampa_preview._preview_adam_kernel,
}
POINTERS = {"ptrs": "*i64", "numels": "*i64", "blk_tensor": "*i32", "blk_start": "*i64", "ncols": "*i64",
            "scales": "*fp32", "norm_ptr": "*fp32", "partials": "*fp32"}
INTS = ("n_tensors",)


def instructions(fn, dtype, vec):
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = {"DTYPE": dtype, "CT": tl.float32, "VEC": vec, "BLOCK": 4096, "EPS": 1e-12,
                              "U_LIST": 6, "MOMENTUM": True}.get(p.name, False)
        else:
            sig[p.name] = POINTERS.get(p.name, "i32" if p.name in INTS else "fp32")
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8})
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", kernel.asm["ptx"])))


if __name__ == "__main__":
    out = {}
    for name, fn in KERNELS.items():
        for dtype, label, vec in ((tl.float32, "fp32", 4), (tl.bfloat16, "bf16", 8)):
            out[f"{name}-{label}-vec{vec}"] = instructions(fn, dtype, vec)
    out["perturb-fp32-vec1"] = instructions(perturb._perturb_kernel, tl.float32, 1)
    print(json.dumps(out))
