"""Reading weights from anywhere, safely, and writing files and folders whole or not at all.

One way to load (``weights_only=True``, zip checksums verified: a checkpoint never runs code
and damaged bytes are refused), one way to write a file (a temporary name in the same
folder, fsynced, renamed), and one way to replace a folder of outputs (a fresh hidden
folder, then one rename of a link; see :func:`replacing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import os
import pickle
import re
import secrets
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from repnet.config import Strict, one_line
from repnet.errors import CheckpointError, DeployError

# Wrappers that prefix every key: LightningModule attribute, DDP, torch.compile.
PREFIXES = ("model.", "module.", "_orig_mod.")
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """Weights with their wrapper prefixes removed, and the hyper-parameters stored beside them."""

    state_dict: dict[str, Tensor]
    hyper_parameters: dict[str, Any] | None


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``model.``, ``module.`` and ``_orig_mod.`` wherever every key starts with one."""
    while state_dict:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _check_zip(path: Path) -> None:
    """Every member of a zip checkpoint (torch's format) read against its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated ({error})") from None
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt: {damaged} fails its checksum")


def _unpickling_error(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """What the weights-only unpickler refused: code it would run, or damaged bytes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    culprit = next((line for line in lines if "GLOBAL" in line), None)
    if culprit is not None:
        return CheckpointError(
            f"refusing {path}: it holds Python objects that would run code when "
            f"unpickled, and checkpoints are only loaded as plain weights ({culprit})"
        )
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler" in line), -1)
    detail = lines[marker + 1] if 0 <= marker < len(lines) - 1 else lines[-1]
    return CheckpointError(
        f"{path} is corrupt or not a plain-weights checkpoint; it was refused unread ({detail})"
    )


def _read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    if zipfile.is_zipfile(path):
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. a pickle protocol note on damaged bytes
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_error(path, error) from None
    except Exception as error:  # torch.load fails in many ways on damaged bytes
        detail = str(error).splitlines()[0].split(". ")[0] if str(error) else ""
        reason = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A Lightning ``.ckpt``, a plain ``state_dict`` ``.pt``/``.pth`` or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    content = _read(path)
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        state, hyper_parameters = content["state_dict"], content.get("hyper_parameters")
    else:
        state, hyper_parameters = content, None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict (a mapping of names to tensors)")
    return Checkpoint(strip_prefixes(state), hyper_parameters)


def os_reason(error: OSError) -> str:
    """An I/O error as a few words: ``No space left on device``."""
    return error.strerror or str(error)


def _fsync_folder(folder: Path) -> None:
    """The folder's entries (new names, renames) made durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written to a temporary name in the same
    folder (the usual permissions), flushed, fsynced, then renamed over ``path``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


@functools.cache
def _atomic_checkpoint_io() -> type:
    """Lightning's ``TorchCheckpointIO`` writing through :func:`write_whole` (built on first
    use, so that loading weights does not import Lightning)."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints written whole (temporary file beside the target, fsync, rename); an
        I/O error is one :class:`CheckpointError` line and leaves the previous file."""

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_whole(path, buffer.getbuffer())
            except OSError as error:
                raise CheckpointError(f"cannot write {path}: {os_reason(error)}") from None

    AtomicCheckpointIO.__module__, AtomicCheckpointIO.__qualname__ = __name__, "AtomicCheckpointIO"
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":
        return _atomic_checkpoint_io()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- folders of outputs, replaced whole ----

FileName = Annotated[str, Field(pattern=r"^\w[\w.-]*$")]  # a plain name in the folder


class FileRecord(Strict):
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Manifest(Strict):
    """``manifest.json``: the files a folder's writer put there, with sizes and SHA-256."""

    written_by: Literal["repnet"] = "repnet"
    files: dict[FileName, FileRecord]


def _record(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return FileRecord(size=path.stat().st_size, sha256=digest.hexdigest())


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, or None where it has none; a damaged one is a :class:`DeployError`."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DeployError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as error:
        raise DeployError(f"cannot read {path}: {os_reason(error)}") from None
    except ValidationError as error:
        reason = one_line(error.errors())
        raise DeployError(f"{path} is not a readable manifest ({reason})") from None


def check_manifest(folder: Path, names: Sequence[str]) -> None:
    """``names`` in ``folder`` are as its manifest records them (size and SHA-256)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise DeployError(f"{folder} holds no {MANIFEST_NAME}: not a complete deploy folder")
    for name in names:
        if name not in manifest.files or not (folder / name).is_file():
            raise DeployError(f"{folder} holds no {name} in its {MANIFEST_NAME}")
        if _record(folder / name) != manifest.files[name]:
            raise DeployError(f"{folder / name} does not match its {MANIFEST_NAME} (changed?)")


def _foreign(out: Path) -> list[str]:
    """Names in ``out`` this module did not write: those its current set's manifest does not
    list, or all of them where ``out`` is a plain folder."""
    current = _current(out)
    manifest = read_manifest(current) if current is not None else None
    listed = {MANIFEST_NAME, *manifest.files} if manifest is not None else set()
    return sorted(p.name for p in out.iterdir() if p.name not in listed)


def _discard(folder: Path) -> None:
    """Remove a set this module wrote: the files its manifest lists, then the folder if that
    leaves it empty; a set never published (no manifest) goes whole."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in [*manifest.files, MANIFEST_NAME]:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _sets(out: Path) -> Iterator[Path]:
    """The hidden sets and links beside ``out`` that :func:`replacing` makes: ``.<name>.<hex>``."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{16}}(\.link)?")
    return (p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _current(out: Path) -> Path | None:
    """The set ``out`` links to, where ``out`` is a link this module made."""
    if not out.is_symlink():
        return None
    target = out.parent / os.readlink(out)
    ours = target.parent == out.parent and target in set(_sets(out)) and target.is_dir()
    return target if ours else None


def _sweep(out: Path) -> None:
    """Sets and links beside ``out`` left by killed or finished writers, except the current."""
    current = _current(out)
    for path in _sets(out):
        if path.is_symlink():
            path.unlink()
        elif path != current:
            _discard(path)


def _refuse_unsafe(out: Path, keep: Sequence[Path]) -> None:
    """A :class:`DeployError` unless ``out`` is new, an empty folder or a set this wrote."""
    for path in keep:
        if out.exists() and path.resolve().is_relative_to(out.resolve()):
            raise DeployError(f"out_dir {out} holds {path}, an input of this deploy")
    if out.is_symlink() and _current(out) is None:
        raise DeployError(f"out_dir {out} is a link this tool did not make")
    if out.exists() and not out.is_dir():
        raise DeployError(f"out_dir {out} exists and is not a folder")
    foreign = _foreign(out) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:4]) + (" …" if len(foreign) > 4 else "")
        raise DeployError(
            f"out_dir {out} holds files this tool did not write ({shown}); "
            "choose a new or empty out_dir"
        )


def _make_folders(folder: Path) -> list[Path]:
    """``folder`` and its missing parents made; returns those it made, innermost first."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DeployError(f"cannot write into {folder}: {os_reason(error)}") from None
    return made


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """``flock`` on ``.<name>.lock`` beside ``out``, or a :class:`DeployError` if another
    writer holds it; the lock file is removed when done."""
    lock = out.with_name(f".{out.name}.lock")
    busy = DeployError(f"another deploy is writing {out}; nothing was written")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise DeployError(f"cannot write into {out.parent}: {os_reason(error)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:
            raise busy  # its holder finished and removed it: a newer lock file is the live one
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _publish(out: Path, folder: Path) -> Path | None:
    """``folder`` described by a manifest, made durable, then ``out`` pointed at it in one
    rename; returns the set ``out`` showed before."""
    manifest = Manifest(files={p.name: _record(p) for p in sorted(folder.iterdir())})
    write_whole(folder / MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    previous = _current(out)
    if out.is_dir() and previous is None:
        out.rmdir()  # an empty folder (checked under the lock)
    link = folder.with_name(f"{folder.name}.link")
    try:
        link.symlink_to(folder.name)
        os.replace(link, out)
    finally:
        link.unlink(missing_ok=True)
    return previous


@contextlib.contextmanager
def replacing(out: str | Path, keep: Sequence[Path] = ()) -> Iterator[Callable]:
    """Hold ``out`` for one writer and yield ``stage()``, a context giving a fresh folder
    that replaces ``out`` whole when its block succeeds.

    ``out`` is a link to ``.<name>.<hex>/``, so readers see the old complete set or the new
    one, never a mix, whenever the writer stops. Refused: the root, a file, a link or folder
    this did not write, a folder holding ``keep`` (the inputs). On failure the fresh folder
    goes and ``out`` is as it was; sets left by killed writers are swept.
    """
    out = Path(os.path.abspath(out))
    if out == Path(out.anchor):
        raise DeployError(f"out_dir {out} is the file system's root")
    made = _make_folders(out.parent)
    try:
        with _lock(out):
            _refuse_unsafe(out, keep)
            _sweep(out)
            yield functools.partial(_stage, out)
    finally:
        if not out.exists():
            for folder in made:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def _stage(out: Path) -> Iterator[Path]:
    """A fresh set beside ``out``, published when the block succeeds, else removed."""
    folder = out.with_name(f".{out.name}.{secrets.token_hex(8)}")
    try:
        folder.mkdir()
        yield folder
        previous = _publish(out, folder)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(error, OSError):
            raise DeployError(
                f"cannot write {out}: {os_reason(error)}; nothing was written"
            ) from None
        raise
    with contextlib.suppress(OSError):  # published: what is left is tidying
        _fsync_folder(out.parent)
        if previous is not None:
            _discard(previous)
