"""Installed distributions made by hand for tests: a folder that looks like site-packages.

``make_dist`` writes a package and its ``*.dist-info`` (METADATA, WHEEL and a RECORD
with sha256 hashes and sizes, as pip writes it), so importlib.metadata, fade's client
and fade's workers see an installed distribution, without a wheel or pip.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import subprocess
import sysconfig
import textwrap
from pathlib import Path


def make_dist(
    site: Path,
    name: str,
    version: str,
    files: dict[str, bytes | str],
    *,
    requires: tuple[str, ...] = (),
    hashes: bool = True,
) -> Path:
    """Install ``files`` (relative path -> content) as distribution ``name`` into ``site``;
    returns its dist-info folder."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    everything: dict[str, bytes | str] = {
        **files,
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n",
        f"{info}/INSTALLER": "pip\n",
    }
    lines = []
    for rel, content in everything.items():
        data = content.encode() if isinstance(content, str) else content
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if hashes:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            lines.append(f"{rel},sha256={digest.decode()},{len(data)}")
        else:
            lines.append(f"{rel},,")
    lines.append(f"{info}/RECORD,,")
    (site / info / "RECORD").write_text("\n".join(lines) + "\n")
    importlib.invalidate_caches()
    return site / info


def build_extension(
    directory: Path,
    name: str,
    body: str,
    *,
    libraries: tuple[str, ...] = (),
    library_dir: Path | None = None,
) -> Path:
    """Compile a C extension module ``name`` whose ``answer()`` returns ``body`` (a C
    expression of type long). Raises OSError or CalledProcessError without a compiler."""
    source = directory / f"{name}.c"
    source.write_text(
        textwrap.dedent(
            f"""
            #include <Python.h>
            long fade_need(void);
            static PyObject *answer(PyObject *self, PyObject *args) {{ return PyLong_FromLong({body}); }}
            static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, ""}}, {{NULL, NULL, 0, NULL}}}};
            static struct PyModuleDef module = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, methods}};
            PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&module); }}
            """
        )
    )
    target = directory / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    argv = ["cc", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source)]
    if library_dir is not None:
        argv.append(f"-L{library_dir}")
    argv += [f"-l{lib}" for lib in libraries]
    subprocess.run([*argv, "-o", str(target)], check=True, capture_output=True, timeout=60)
    source.unlink()
    return target


def build_library(directory: Path, name: str) -> Path:
    """A shared library ``lib<name>.so`` with ``long fade_need(void)`` (returns 7)."""
    source = directory / f"{name}.c"
    source.write_text("long fade_need(void) { return 7; }\n")
    target = directory / f"lib{name}.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", str(source), "-o", str(target)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    source.unlink()
    return target


def tree_of(cache: Path) -> list[str]:
    """The distribution trees and staging folders of a worker's package cache."""
    dists = cache / "packages" / "dists"
    return sorted(os.listdir(dists)) if dists.is_dir() else []
