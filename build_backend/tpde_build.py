"""PEP 517 build backend of tpde-hf: setuptools, plus the auto-registration ``.pth`` file.

``tpde_hf-autoregister.pth`` must sit at the root of site-packages to be executed at interpreter
start (see ``tpde_hf/_autoregister.py``). setuptools cannot place a file there from
``pyproject.toml`` alone, for wheels *and* editable installs, so this thin wrapper adds it to
every wheel setuptools builds (``pip install .``, ``pip install -e .``, ``python -m build``)
and records it in the wheel's ``RECORD`` (so ``pip uninstall`` removes it). The sdist gets this
file added, so a wheel built from the sdist has the hook too.

Example (pyproject.toml)::

    [build-system]
    requires = ["setuptools>=68"]
    build-backend = "tpde_build"
    backend-path = ["build_backend"]
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import os
import tarfile
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export every hook unchanged)

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _autoregister():
    """Load ``tpde_hf/_autoregister.py`` by path (importing ``tpde_hf`` would need torch)."""
    path = os.path.join(_ROOT, "tpde_hf", "_autoregister.py")
    spec = importlib.util.spec_from_file_location("_tpde_hf_autoregister_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def add_pth_to_wheel(wheel_path: str) -> None:
    """Rewrite ``wheel_path`` with the ``.pth`` file at its root and a matching RECORD line."""
    auto = _autoregister()
    name, content = auto.PTH_NAME, auto.PTH_CONTENT.encode()
    with zipfile.ZipFile(wheel_path) as src:
        items = [(info, src.read(info.filename)) for info in src.infolist()]
    if any(info.filename == name for info, _ in items):
        return
    record = next(info.filename for info, _ in items if info.filename.endswith(".dist-info/RECORD"))
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), content)
        for info, data in items:
            if info.filename == record:
                lines = data.decode().splitlines()
                lines.insert(len(lines) - 1 if lines and lines[-1].startswith(record) else len(lines),
                             _record_line(name, content))
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    os.replace(tmp, wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_pth_to_wheel(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_pth_to_wheel(os.path.join(wheel_directory, name))
    return name


def build_sdist(sdist_directory, config_settings=None):
    """setuptools' sdist, plus this backend (needed to build a wheel from the sdist)."""
    name = _setuptools.build_sdist(sdist_directory, config_settings)
    path = os.path.join(sdist_directory, name)
    base = name[: -len(".tar.gz")]
    with tarfile.open(path, "r:gz") as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    arcname = f"{base}/build_backend/tpde_build.py"
    if any(m.name == arcname for m, _ in members):
        return name
    with open(__file__, "rb") as fh:
        own = fh.read()
    with tarfile.open(path + ".tmp", "w:gz", format=tarfile.PAX_FORMAT) as dst:
        for m, data in members:
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = len(own), 0o644, 0
        dst.addfile(info, io.BytesIO(own))
    os.replace(path + ".tmp", path)
    return name
