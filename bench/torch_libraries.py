"""Makes `import torch` work with the project's lean torch install.

torch's Python extension needs CUDA libraries that scripts/setup-reference.sh keeps outside site-packages
(<venv>/lisa-reference-cuda, so that the Rust build does not start linking libtorch_cuda). Call
`ensure()` before `import torch`: it re-executes the running script once with their lib/ folders on
LD_LIBRARY_PATH.
"""
import os
import sys


def ensure():
    """Re-executes with <venv>/lisa-reference-cuda/nvidia/*/lib on LD_LIBRARY_PATH (once)."""
    root = os.path.join(sys.prefix, "lisa-reference-cuda", "nvidia")
    if not os.path.isdir(root) or os.environ.get("LISA_REFERENCE_REEXEC") == "1":
        return
    libs = sorted(os.path.join(root, d, "lib") for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "lib")))
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if all(lib in current.split(":") for lib in libs):
        return
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libs + ([current] if current else [])), LISA_REFERENCE_REEXEC="1")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
