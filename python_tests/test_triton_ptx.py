"""The Triton kernels' memory accesses are 16-byte vectors on the GPU. The interpreter that runs
them here cannot show it, so the kernels are compiled for sm_90 (Triton's compiler needs no GPU)
and their PTX is read: a change that makes the compiler lose the alignment or the mask's
constancy (4-byte accesses: about half the bandwidth) fails here, not on the next GPU run."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE)
    run = subprocess.run([sys.executable, os.path.join(HERE, "ptx_vector_width.py")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


KERNELS = ["perturb", "sumsq", "restore", "restore_sgd", "restore_adam", "rank1", "preview_sgd", "preview_adam"]


@pytest.mark.parametrize("dtype", ["fp32-vec4", "bf16-vec8"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_element_accesses_are_16_byte_vectors(ptx, kernel, dtype):
    found = ptx[f"{kernel}-{dtype}"]
    assert "ld.global.v4.b32" in found, found
    if kernel != "sumsq":  # the norm's first pass stores one partial sum per program
        assert "st.global.v4.b32" in found, found


def test_the_check_tells_scalar_from_vector_code(ptx):
    """With VEC = 1 (counts not multiples of the vector width) the accesses are 4-byte ones."""
    found = ptx["perturb-fp32-vec1"]
    assert "ld.global.v4.b32" not in found and "st.global.b32" in found, found


@pytest.mark.parametrize("kernel", ["finalize", "guard", "gemv_t", "gemv", "finish", "scales"])
def test_scalar_kernels_build_for_sm_90(ptx, kernel):
    """The kernels without element lists (the norm's finalize, the step's guard, the power
    iteration's GEMVs and finish, nuSAM's scales) compile for the GPU: the interpreter cannot tell."""
    assert any(i.startswith("st.global") for i in ptx[kernel]), ptx[kernel]


@pytest.mark.parametrize("kernel", ["gemv_t", "gemv"])
def test_power_iteration_reads_16_byte_rows_as_vectors(ptx, kernel):
    """Matrices whose rows are 16-byte aligned go to the VEC launches: their tiles load 16 bytes a
    thread (the power iteration's bandwidth on the H100 was 19% of copy)."""
    assert "ld.global.v4.b32" in ptx[f"{kernel}-fp32-vec4"], ptx[f"{kernel}-fp32-vec4"]
