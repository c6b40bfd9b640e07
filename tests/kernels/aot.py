"""Compile Triton kernels for a Hopper GPU (sm_90) with the real Triton compiler, without a GPU.

Used by the kernel tests: it catches code that the interpreter accepts but the compiler rejects.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

AOT_SCRIPT = r"""
import ast, importlib, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
mod = importlib.import_module(sys.argv[1])
for name, sig, const in ast.literal_eval(sys.argv[2]):
    fn = getattr(mod, name)
    sig = dict(sig, **{k: "constexpr" for k in const})
    const = {k: (getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v) for k, v in const.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
print("AOT-OK")
"""


def aot_compile(module, specs):
    if torch.cuda.is_available():
        pytest.skip("real CUDA present: the cuda-marked tests compile and run the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, module, repr(specs)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and ("ASTSource" in out and "TypeError" in out or "ptxas" in out.lower()
                                 and "not found" in out.lower()):
        pytest.skip("this Triton cannot compile ahead of time here: " + out[-300:])
    assert "AOT-OK" in proc.stdout, out[-3000:]
