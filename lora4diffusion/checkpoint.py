"""Bytes on disk: safetensors for tensors, JSON for configs, atomic writes. No pickle anywhere; no model.

Every write goes to a temporary file first, is fsynced and renamed into place (then the directory is synced),
so a crash or power loss never leaves a half file. Every read is checked before use: config values by the
config dataclasses (folders/), tensor names/shapes/dtypes against the network built on the meta device
(before any memory is allocated), every float tensor for NaN/inf. Every failure is a UserError naming the
file and the problem: never a silent fresh start. docs/RELIABILITY.md lists the cases and the tests.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from lora4diffusion.errors import UserError, describe_os_error

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_JSON_BYTES = 16 << 20  # our configs are a few KiB; a larger "config" is not ours (json parses it whole)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype codes of float tensors
_DTYPE_NAMES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_CODES = {v: k for k, v in _DTYPE_NAMES.items()}


def path_kind(path: str | Path) -> str:
    """"file", "dir", "missing" or "other" for ``path``; a UserError where it cannot be looked at (a parent
    directory without permission: ``Path.is_file`` would raise PermissionError there)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        raise UserError(f"{path}: cannot read ({describe_os_error(e)})") from None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def check_readable(path: str | Path) -> Path:
    """``path`` is a regular file this process may read; else a UserError saying which of those fails.

    Separate from the reader so that a permission problem is called that, not "corrupt or truncated".
    """
    path = Path(path)
    kind = path_kind(path)
    if kind != "file":
        raise UserError(f"{path}: " + {"missing": "file not found", "dir": "not a file (a directory)",
                                        "other": "not a regular file"}[kind])
    try:
        with open(path, "rb"):  # os.access lies for root and on some file systems: try it
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot read ({describe_os_error(e)})") from None
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry is on disk only once the directory is synced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms/file systems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the
    directory. A crash (SIGKILL, power loss) leaves either the old file or the new one, never a half file;
    a failed write (full disk, permissions) leaves the old file untouched and is one UserError line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)  # the data must be on disk before the rename makes it visible
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights are meant to be shared
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:
        kept = " (the previous file is unchanged)" if path.exists() else ""
        why = describe_os_error(e) if isinstance(e, OSError) else str(e).splitlines()[0][:160]
        raise UserError(f"{path}: cannot write ({why}){kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    check_readable(path)
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise UserError(f"{path}: {size} bytes, too large for a config (limit {MAX_JSON_BYTES})")
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({describe_os_error(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def _no_constant(name: str) -> None:
    # json.loads accepts NaN, Infinity and -Infinity, which are not JSON: a config never needs them
    raise ValueError(f"{name} is not a JSON number")


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def _corrupt(path: Path, e: Exception) -> UserError:
    first = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return UserError(f"{path}: corrupt or truncated safetensors file ({first})")


def tensor_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from a safetensors header, without reading (or allocating) any tensor data.

    safetensors itself checks that every tensor's byte range lies inside the file, so the shapes here are
    backed by real bytes: comparing them with a model before loading bounds the memory a file can ask for.
    """
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _corrupt(path, e) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, unreadable, truncated or corrupt file, or one holding NaN/inf in a
    float tensor (never a usable weight or state), is a UserError naming the file (and the tensor)."""
    check_readable(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _corrupt(path, e) from None
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: tensor {key} holds NaN or infinite values")
    return tensors


def read_metadata(path: Path) -> dict[str, str]:
    check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise _corrupt(path, e) from None


def check_against(module_state: dict[str, torch.Tensor], found: dict[str, tuple[tuple[int, ...], str]],
                  where: Path | str, what: str = "the config") -> None:
    """The names, shapes and dtypes in a file (``tensor_header``) against a module's ``state_dict()``
    (which may live on the meta device). Float parameters need float tensors (an int64 or bool tensor is
    refused, not cast); integer buffers take their own dtype or a float one."""
    missing = sorted(set(module_state) - set(found))
    unexpected = sorted(set(found) - set(module_state))
    if missing or unexpected:
        raise UserError(
            f"{where}: weights do not match {what}"
            f" (missing {missing[:3]}{'...' if len(missing) > 3 else ''},"
            f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, (shape, dtype) in found.items():
        own = module_state[k]
        if tuple(shape) != tuple(own.shape):
            raise UserError(f"{where}: weight {k} has shape {tuple(shape)}, {what} needs {tuple(own.shape)}")
        # our writers store integer buffers (BatchNorm's counter) as float32 too, so those may be either
        ok = dtype in FLOAT_DTYPES or (not own.is_floating_point() and _DTYPE_NAMES.get(dtype) == own.dtype)
        if not ok:
            raise UserError(f"{where}: weight {k} has dtype {dtype}, {what} needs {own.dtype}")


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load that names what does not fit instead of raising torch's long RuntimeError."""
    header = {k: (tuple(v.shape), _DTYPE_CODES.get(v.dtype, str(v.dtype))) for k, v in state.items()}
    check_against(module.state_dict(), header, where)
    module.load_state_dict(state)


class _NoInitialisers(TorchFunctionMode):
    """Skips weight initialisers (``nn.init.*``, ``Tensor.normal_``, ...) while a shell is built on the meta
    device: they fill nothing there (shapes and dtypes are the constructor's), and the meta kernels of some
    (``normal_``: an ``nn.Embedding``) import torch._dynamo, a second of every process's start-up."""

    RANDOM_FILLS = frozenset(getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "exponential_",
                                                                "log_normal_", "cauchy_", "geometric_",
                                                                "random_", "bernoulli_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" or func in self.RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]  # the tensor, unchanged
        return func(*args, **(kwargs or {}))


def load_weights(module_factory: Callable[[], nn.Module], path: Path) -> nn.Module:
    """Build a module and load ``path`` into it, checking the file's header (names, shapes, dtypes) against
    the module built on the meta device first: nothing is allocated for a file that does not fit."""
    with torch.device("meta"), _NoInitialisers():
        shell = module_factory()
    check_against(shell.state_dict(), tensor_header(path), path)
    module = module_factory()
    load_state_into(module, load_tensors(path), path)
    return module
