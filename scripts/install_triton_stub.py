"""Copies the Python-backend stub for this interpreter's version into Triton's backend
folder (the nvidia-pytriton wheel ships one stub per Python version beside it)."""

import shutil
import sys
from pathlib import Path

import pytriton

server = Path(pytriton.__file__).parent / "tritonserver"
version = f"{sys.version_info.major}.{sys.version_info.minor}"
stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
if not stub.exists():
    sys.exit(
        f"no Triton Python-backend stub for Python {version} in {stub.parent.parent}; "
        "use Python 3.8-3.13 for the Triton runtime (PYTHON=python3.11 make setup)"
    )
target = server / "backends" / "python" / "triton_python_backend_stub"
shutil.copy2(stub, target)
print(f"Triton Python-backend stub for Python {version} installed")
