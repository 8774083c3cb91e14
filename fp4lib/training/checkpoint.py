"""Checkpoints that are all or nothing, and an output directory that one run holds at a time.

A run's output directory (``--out``) holds:

* ``ckpt-<step>/`` -- one checkpoint: ``ckpt.pt`` (the trainer's state; under
  ``--dist`` the step and history, with ``rank<r>.pt`` per rank and the sharded
  model and optimizer in ``dcp/``) and ``manifest.json``;
* ``ckpt.current`` -- the name of the current checkpoint directory;
* ``metrics.jsonl`` -- one JSON record per line, appended and flushed line by line;
* ``run.lock`` -- the lock of the run that is using the directory.

**Saving** (:func:`stage`, :func:`commit`) writes every file of a checkpoint into a
fresh staging directory ``ckpt-<step>.tmp``, then its :data:`MANIFEST_FILE` (the
facts a resume must match, and the SHA-256 of every file), renames the directory
to its final name and makes it current by replacing ``ckpt.current`` with one
atomic rename. A save interrupted at any point leaves the previous checkpoint
intact and current; leftovers are removed by the next run (:func:`recover`).

**Resuming** (:func:`load_manifest`, :func:`verify`) checks the digests of every
file and refuses, naming the field and both values, a checkpoint made with
another recipe, preset, seed, corpus, torch version, number of processes,
distribution mode (or a plain checkpoint under ``--dist`` and the reverse),
``--amax-reduce``, ``--grad-comm`` or final high-precision fraction.

**The directory** (:func:`claim`): a run takes ``run.lock`` (an ``flock`` held
for the life of the process; the file names the holder's pid and host), so a
second live run on the same directory is refused, naming the holder, and a lock
left by a dead process is reclaimed. A fresh run refuses a directory that is not
empty unless told to overwrite it; an overwriting run leaves the previous run's
checkpoint and metrics in place until its own first checkpoint replaces them
(its metrics go to ``metrics.jsonl.new`` until then).

**Test hook.** ``FP4LIB_TEST_FAULT=POINT@STEP[@RANK[@stall]]`` makes the process
exit at once (``os._exit(86)``, no clean-up) when a save of step ``STEP`` reaches
``POINT`` (:data:`FAULT_POINTS`), on every rank or only on ``RANK``; with
``@stall`` the rank sleeps there instead (an hour), and the point ``stall`` makes
it sleep before training step ``STEP``. The tests use it to simulate crashes and
stalled ranks; it is not meant for anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "MANIFEST_FILE", "POINTER_FILE", "LOCK_FILE", "RunDirError",
           "ResumeError", "current_checkpoint", "stage", "commit", "write_manifest", "load_manifest", "verify",
           "claim", "Claim", "recover", "read_metrics", "new_run_id", "fault", "FAULT_POINTS", "MANIFEST_FIELDS"]

log = logging.getLogger("fp4lib.training.checkpoint")

CHECKPOINT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "ckpt.current"
LOCK_FILE = "run.lock"
STAGED_SUFFIX = ".new"  # metrics of an overwriting run before its first checkpoint
_LEGACY = ("ckpt.pt", "ckpt.tmp", "ckpt_dcp", "ckpt_dcp.tmp")  # the layout before manifests
FAULT_ENV = "FP4LIB_TEST_FAULT"
FAULT_POINTS = ("before_rank_files", "before_manifest", "before_commit", "before_cleanup", "stall")
FAULT_EXIT = 86
MANIFEST_FORMAT = 1
MANIFEST_FIELDS = ("kind", "world_size", "dist", "amax_reduce", "grad_comm", "recipe", "preset", "seed",
                   "corpus_sha256", "hp_final_fraction", "torch")
"""What a resume must match, in the order it is checked (the step is recorded too)."""


class RunDirError(ValueError):
    """A problem with the output directory or its checkpoint. ``argument`` names the
    command-line argument it concerns (``"--out"`` or ``"--resume"``)."""

    def __init__(self, message: str, argument: str = "--out"):
        super().__init__(message)
        self.argument = argument


class ResumeError(RunDirError):
    """A checkpoint that cannot be resumed here: missing, corrupt, or made by another run."""

    def __init__(self, message: str):
        super().__init__(message, argument="--resume")


def new_run_id() -> str:
    """A fresh identifier tying a run's checkpoints to its metrics."""
    return uuid.uuid4().hex[:16]


def fault(point: str, step: int, rank: int = 0) -> None:
    """The test hook (see the module docs): exit at ``point`` of step ``step`` if
    ``FP4LIB_TEST_FAULT`` asks for it; otherwise do nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split("@")
    if parts[0] != point or len(parts) < 2 or int(parts[1]) != step:
        return
    if len(parts) > 2 and parts[2] and int(parts[2]) != rank:
        return
    if point == "stall" or parts[3:4] == ["stall"]:
        time.sleep(3600)
    os._exit(FAULT_EXIT)


# ---------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def current_checkpoint(out_dir) -> Optional[Path]:
    """The current checkpoint directory of ``out_dir`` (``None`` if it has none).

    Raises :class:`ResumeError` when ``ckpt.current`` names no checkpoint directory,
    or when the directory holds only a checkpoint of the layout before manifests.
    """
    out = Path(out_dir)
    pointer = out / POINTER_FILE
    if not pointer.is_file():
        if (out / CHECKPOINT_FILE).is_file():
            raise ResumeError(f"{out / CHECKPOINT_FILE} was written by an older fp4lib without a manifest, so it "
                              f"cannot be verified; start the run again with --overwrite")
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ResumeError(f"{pointer} is unreadable ({e}); it should name the current checkpoint directory")
    path = out / name
    if not name or "/" in name or name.startswith(".") or not path.is_dir():
        raise ResumeError(f"{pointer} names {name[:80]!r}, which is not a checkpoint directory in {out}")
    return path


def stage(out_dir, step: int, clear: bool = True) -> Path:
    """The staging directory of a checkpoint of step ``step`` (created empty when ``clear``)."""
    path = Path(out_dir) / f"ckpt-{step:08d}.tmp"
    if clear:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    return path


def write_manifest(staging: Path, step: int, fields: Dict, run_id: Optional[str]) -> dict:
    """Write ``manifest.json`` into ``staging``: ``fields`` (:data:`MANIFEST_FIELDS`), the step,
    the run id and the SHA-256 of every other file there. Returns the manifest."""
    missing = [k for k in MANIFEST_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"manifest fields missing: {missing}")
    for p in _files(staging):  # the files' bytes are on disk before the manifest vouches for them
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "run_id": run_id,
                **{k: fields[k] for k in MANIFEST_FIELDS},
                "files": {p.relative_to(staging).as_posix(): _sha256(p) for p in _files(staging)}}
    _write_atomic(staging / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def commit(out_dir, staging: Path, step: int, rank: int = 0) -> Path:
    """Make the staged checkpoint current: rename it to ``ckpt-<step>`` and replace
    ``ckpt.current`` (one atomic rename), then remove what the previous checkpoint
    and an overwritten run left (:func:`recover`). Returns the checkpoint directory."""
    out = Path(out_dir)
    final = out / f"ckpt-{step:08d}"
    n = 0
    while final.exists():  # the current checkpoint may have this step (an overwritten run's)
        n += 1
        final = out / f"ckpt-{step:08d}-{n}"
    fault("before_commit", step, rank)
    os.rename(staging, final)
    _fsync_dir(out)
    _write_atomic(out / POINTER_FILE, final.name + "\n")
    fault("before_cleanup", step, rank)
    recover(out)
    return final


def load_manifest(ckpt_dir: Path) -> dict:
    """The manifest of the checkpoint directory ``ckpt_dir``; :class:`ResumeError` if it is
    missing or unreadable."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ResumeError(f"checkpoint {ckpt_dir} has no {MANIFEST_FILE}; it is incomplete")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path} is unreadable: {e}")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ResumeError(f"{path} is not a checkpoint manifest (no 'files' table)")
    return manifest


def _describe_kind(fields: Dict) -> str:
    if fields.get("kind") == "distributed":
        return f"a distributed run (--dist {fields.get('dist')}, {fields.get('world_size')} process(es))"
    return "a single-process run (no --dist)"


def verify(ckpt_dir: Path, expected: Dict) -> dict:
    """Check a checkpoint against the run that wants to resume it; return its manifest.

    ``expected`` holds this run's :data:`MANIFEST_FIELDS`. Raises
    :class:`ResumeError` naming the first field that differs (with both values), or
    the first file that is missing or whose SHA-256 differs from the manifest's.
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = load_manifest(ckpt_dir)
    where = f"the checkpoint {ckpt_dir} (step {manifest.get('step')})"
    if manifest.get("kind") != expected.get("kind"):
        raise ResumeError(f"{where} was written by {_describe_kind(manifest)}; this run is {_describe_kind(expected)}")
    if manifest.get("world_size") != expected.get("world_size"):
        raise ResumeError(f"{where} was written by {manifest.get('world_size')} process(es); resume it with the "
                          f"same number, not {expected.get('world_size')}")
    for key in MANIFEST_FIELDS:
        if manifest.get(key) != expected.get(key):
            raise ResumeError(f"{where} was made with {key}={manifest.get(key)!r}, not {expected.get(key)!r}")
    for name, digest in manifest["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            raise ResumeError(f"{where} is missing {name}")
        actual = _sha256(path)
        if actual != digest:
            raise ResumeError(f"{path} is corrupt: its sha256 is {actual[:16]}..., the manifest records "
                              f"{str(digest)[:16]}...")
    return manifest


def torch_load(path: Path, map_location="cpu"):
    """``torch.load`` of a checkpoint file, with a :class:`ResumeError` naming it if it is unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several kinds for a damaged file
        raise ResumeError(f"{path} is unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


# ---------------------------------------------------------------------------- metrics
def read_metrics(path: Path) -> List[dict]:
    """The records of a metrics file. A partial last line (a run killed while writing
    it) is ignored with a warning; a damaged line elsewhere raises :class:`ResumeError`
    naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ResumeError(f"{path} is not text: {e}")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i >= len(lines) - 2 and all(not l.strip() for l in lines[i + 1:]):
                log.warning("%s: ignoring its partial last line %d (%s)", path, i + 1, e)
                continue
            raise ResumeError(f"{path}: line {i + 1} is not a JSON record ({e})")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------- the directory
def _proc_start(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _proc_start(pid) in (None, start)


class _Lock:
    """``run.lock``: an exclusive ``flock`` held while the run lives (released by the
    kernel if the process dies), in a file that names its holder."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: Optional[int] = None

    def _holder(self) -> dict:
        try:
            rec = json.loads(self.path.read_text() or "{}")
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> RunDirError:
        return RunDirError(f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on host "
                           f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to end or "
                           f"choose another --out")

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: a lock file checked by pid
            fcntl = None
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    holder = self._holder()
                    raise self._refuse(holder)
                try:  # the file may have been removed by its last holder meanwhile: lock the one that is there
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            else:  # pragma: no cover
                holder = self._holder()
                if holder.get("pid") and holder.get("host") == me["host"] and _alive(holder["pid"], holder.get("start")) \
                        and holder.get("pid") != me["pid"]:
                    os.close(fd)
                    raise self._refuse(holder)
            old = self._holder()
            if old.get("pid"):
                log.warning("%s: reclaimed a stale lock left by pid %s on host %s (no longer running)", self.path,
                            old.get("pid"), old.get("host"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return
        raise RunDirError(f"could not take {self.path}: it keeps being replaced")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # still holding the lock: a waiter re-checks the inode
        except FileNotFoundError:  # pragma: no cover
            pass
        os.close(self.fd)
        self.fd = None


def _is_run_artifact(name: str) -> bool:
    return (name in (METRICS_FILE, METRICS_FILE + STAGED_SUFFIX, POINTER_FILE, POINTER_FILE + ".tmp")
            or name in _LEGACY or name.startswith("ckpt-") or (name.startswith("rank") and name.endswith(".pt")))


def recover(out_dir) -> None:
    """Finish or undo what an interrupted save or overwrite left in ``out_dir``.

    Keeps the current checkpoint; removes staging and superseded checkpoint
    directories. Staged metrics (``metrics.jsonl.new``) of the run that owns the
    current checkpoint replace ``metrics.jsonl`` (with the previous run's other
    files); staged metrics of a run that never checkpointed are left for that run.
    """
    out = Path(out_dir)
    try:
        current = current_checkpoint(out)
    except ResumeError:
        return  # nothing safe to tidy; a resume will say what is wrong
    if current is None:
        return
    owner = None
    try:
        owner = json.loads((current / MANIFEST_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        pass
    staged = out / (METRICS_FILE + STAGED_SUFFIX)
    if owner and staged.is_file():
        first = next(iter(read_metrics_head(staged)), {})
        if first.get("run_id") == owner:
            for name in _LEGACY:  # the overwritten run's files of the old layout
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            for p in out.glob("rank*.pt"):
                p.unlink()
            os.replace(staged, out / METRICS_FILE)
    for p in out.glob("ckpt-*"):
        if p != current and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def read_metrics_head(path: Path) -> List[dict]:
    """The first record of a metrics file, as a list (empty if it has none or it is unreadable)."""
    try:
        with open(path) as f:
            return [json.loads(f.readline())]
    except (OSError, ValueError):
        return []


@dataclass
class Claim:
    """The output directory, held: ``stage_metrics`` is True when a fresh run replaces a
    previous one (its metrics go to ``metrics.jsonl.new`` until its first checkpoint)."""

    out: Path
    stage_metrics: bool
    lock: _Lock


@contextlib.contextmanager
def claim(out_dir, resume: bool = False, overwrite: bool = False) -> Iterator[Claim]:
    """Hold ``out_dir`` for one run: create it, take its lock, and check that a fresh run
    may write there (empty, or ``overwrite``). Raises :class:`RunDirError` (a
    ``ValueError``) naming the directory and what was found; releases the lock on exit.
    """
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the directory and --overwrite replaces it; give one")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory; --out needs a directory (new or a run's)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _Lock(out)
        lock.acquire()
    except RunDirError:
        raise
    except OSError as e:
        raise RunDirError(f"cannot write in {out}: {e.strerror or e}; --out needs a writable directory")
    try:
        if not os.access(out, os.W_OK):
            raise RunDirError(f"cannot write in {out}: it is read-only; --out needs a writable directory")
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        previous = [n for n in entries if _is_run_artifact(n)]
        if entries and not resume and not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise RunDirError(f"{out} is not empty (it holds {shown}); add --resume to continue the run in it or "
                              f"--overwrite to replace it (the previous run stays until the new one's first "
                              f"checkpoint)")
        staged = out / (METRICS_FILE + STAGED_SUFFIX)
        recover(out)
        if staged.exists():  # a run that was replacing this one died before its first checkpoint
            staged.unlink()
        for p in out.glob("ckpt-*.tmp"):  # interrupted saves
            shutil.rmtree(p, ignore_errors=True)
        yield Claim(out, stage_metrics=bool(previous) and not resume, lock=lock)
    finally:
        lock.release()
