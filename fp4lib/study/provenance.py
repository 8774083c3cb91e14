"""Where a stored number came from: the code that made it, and the machine and numeric environment it ran in."""

from __future__ import annotations

import ast
import hashlib
import os
import platform
from pathlib import Path
from typing import List, Sequence

import torch

__all__ = ["CODE_FILES", "PACKAGE_DIR", "FINGERPRINT_ENV", "code_hash", "numeric_fingerprint", "machine_info",
           "describe_environment", "torch_release", "comparable_fingerprint", "same_environment"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the fp4lib package, whose code is hashed

CODE_FILES = ("numerics/*.py", "training/*.py", "study/runner.py:run_experiment")
"""The code of ``fp4lib`` that decides a run's stored numbers: the numerics and
training layers (glob patterns relative to the package), and ``module.py:function``
for the one function of the study that makes a record. Recorded with each result as
where it came from; whether a result is current is decided by what the code
computes (:mod:`fp4lib.study.behaviour`), not by this hash, so that moving code
between modules leaves stored results current."""

FINGERPRINT_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                   "DNNL_MAX_CPU_ISA")
"""Environment variables that steer which CPU kernels run. The thread count is
recorded as the number torch uses, whatever set it (``OMP_NUM_THREADS`` or
``torch.set_num_threads``)."""
_NOT_NUMERIC_ENV = ("OMP_NUM_THREADS",)  # recorded by older fingerprints; the thread count already says it


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _code_tree(package_dir: Path, entry: str) -> ast.AST:
    name, _, function = entry.partition(":")
    tree = ast.parse((package_dir / name).read_text(), filename=name)
    if function:
        found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == function]
        if not found:
            raise ValueError(f"CODE_FILES names {entry!r}, but {name} defines no {function!r}")
        tree = found[0]
    return _strip_docstrings(tree)


def code_hash(files: Sequence[str] = CODE_FILES, package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 (hex) of the code of ``files`` in ``fp4lib``: their syntax trees with
    comments and docstrings removed, so that editing documentation does not make
    stored results stale, while any change to the code does. An entry
    ``"module.py:name"`` hashes one top-level function or class of a module, and
    an entry with ``*`` every module it matches.

    Examples
    --------
    >>> len(code_hash()), code_hash() == code_hash()
    (64, True)
    """
    h = hashlib.sha256()
    entries = []
    for entry in files:
        if "*" in entry:
            entries += sorted(p.relative_to(package_dir).as_posix() for p in package_dir.glob(entry))
        else:
            entries.append(entry)
    for entry in sorted(entries):
        tree = _code_tree(package_dir, entry)
        h.update(entry.encode() + b"\0" + ast.dump(tree, include_attributes=False).encode() + b"\0")
    return h.hexdigest()


def _cpu_flags() -> List[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def numeric_fingerprint(device: str = "cpu", precision: str = "fp32") -> dict:
    """What decides the last bits of a run's floats, besides the code and the data.

    The torch version; ATen's CPU kernel set (``torch.backends.cpu.get_cpu_capability()``,
    which ``ATEN_CPU_CAPABILITY`` can lower); the processor's vector instruction sets
    (MKL and oneDNN pick their kernels from these, whatever ATen uses); whether
    oneDNN and MKL are in use; the environment variables that steer them; the
    thread count; the device and the precision. Two runs with equal fingerprints
    give identical losses, bit for bit.

    Examples
    --------
    >>> fp = numeric_fingerprint()
    >>> sorted(fp)[:4], fp["device"]
    (['aten_cpu_capability', 'cpu_vector_isa', 'device', 'env'], 'cpu')
    """
    flags = set(_cpu_flags())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve") if f in flags]
    return {
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vector_isa": isa or [platform.machine()],
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "mkl": bool(torch.backends.mkl.is_available()),
        "env": {k: os.environ[k] for k in FINGERPRINT_ENV if k in os.environ},
        "threads": torch.get_num_threads(),
        "device": device,
        "precision": precision,
    }


def machine_info() -> dict:
    """CPU model, core count, torch threads, GPU, OS, Python and torch versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def torch_release(version: str) -> str:
    """A torch version without its local build tag: ``"2.13.0+cpu"`` and ``"2.13.0"`` are one release.

    Examples
    --------
    >>> torch_release("2.13.0+cpu"), torch_release("2.13.0")
    ('2.13.0', '2.13.0')
    """
    return str(version).split("+", 1)[0]


def comparable_fingerprint(fp: dict) -> dict:
    """The parts of a :func:`numeric_fingerprint` that decide numbers, in one form.

    The torch release without its build tag (the ``+cpu`` build of PyPI's CPU
    index and the default build run the same kernels on a CPU), and the
    environment variables without ``OMP_NUM_THREADS`` and ``ATEN_CPU_CAPABILITY``
    (the thread count and the kernel set are recorded as such).
    """
    out = dict(fp)
    out["torch"] = torch_release(fp.get("torch", ""))
    out["env"] = {k: v for k, v in (fp.get("env") or {}).items()
                  if k not in _NOT_NUMERIC_ENV and k != "ATEN_CPU_CAPABILITY"}
    return out


def same_environment(a: dict, b: dict) -> bool:
    """Whether two fingerprints name one numeric environment (:func:`comparable_fingerprint`).

    Examples
    --------
    >>> fp = numeric_fingerprint()
    >>> same_environment(fp, dict(fp, torch=fp["torch"] + "+local", env={"OMP_NUM_THREADS": "1"}))
    True
    >>> same_environment(fp, dict(fp, threads=fp["threads"] + 1))
    False
    """
    return comparable_fingerprint(a) == comparable_fingerprint(b)


def describe_environment(fp: dict) -> str:
    """One line naming a :func:`numeric_fingerprint`."""
    return (f"torch {fp.get('torch')}, ATen {fp.get('aten_cpu_capability')}, CPU {'/'.join(fp.get('cpu_vector_isa', []))}, "
            f"{fp.get('threads')} thread(s), {fp.get('device')} {fp.get('precision')}"
            + (f", {fp['env']}" if fp.get("env") else ""))
