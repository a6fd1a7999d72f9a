"""python -m sam_kernels.info: the environment report (versions, the extension, the toolchain, the
backends per device with the reason for each missing one, what backend='auto' picks)."""
import json
import os
import subprocess
import sys

from sam_kernels import info
from sam_kernels.ops import extension
from sam_kernels.ops.primitives import OPERATORS


def test_report_says_what_runs_and_why_not(capsys):
    r = info.main([])
    text = capsys.readouterr().out
    cpu = r["devices"][0]
    assert cpu["device"] == "cpu" and cpu["backends"]["torch"] == "available"
    assert cpu["backends"]["cpu"] == ("available" if extension.loaded() else cpu["backends"]["cpu"])
    assert "runs on CUDA tensors" in cpu["backends"]["cuda"]  # the reason, in words
    assert set(cpu["auto"]) == {p.name for p in OPERATORS}
    assert set(cpu["auto"].values()) <= {"cpu", "torch"}
    assert r["versions"]["torch"] == __import__("torch").__version__
    assert "backend='auto' runs" in text and "extension" in text


def test_json_and_a_missing_extension():
    env = {**os.environ, "SAM_KERNELS_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-m", "sam_kernels.info", "--json"], env=env, capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout)
    assert not r["extension"]["loaded"] and "SAM_KERNELS_DISABLE_EXT" in r["extension"]["error"]
    assert "native extension is not loaded" in r["devices"][0]["backends"]["cpu"]
    assert set(r["devices"][0]["auto"].values()) == {"torch"}
