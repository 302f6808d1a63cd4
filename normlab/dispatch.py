"""One dispatch point for every op: which backend computes it.

Backends are ``reference`` (plain PyTorch, any device and dtype — the spec), ``cpu`` (native C++
operators) and ``triton`` (GPU kernels). A backend module registers the entry points of the kernel contract
(:mod:`normlab.kernels.contract`) with :func:`register_kernels`; the op files ask :func:`select` which backend
serves a call and :func:`kernel` (or :func:`native`) for the function. A decision is
cached per (op, device, dtypes, options), so the choice costs a dictionary look-up.

Choice, most specific first: the ``backend=`` argument of a call, the innermost
``with normlab.backend(name):`` block, the ``NORMLAB_BACKEND`` environment variable, else the
fastest registered backend that supports the input. A backend that cannot serve the input falls back
to ``reference`` — never to a wrong answer. Naming an unknown backend is an error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

REFERENCE = "reference"
#: Backends known to normlab, fastest first, and the module that registers each one on import.
KNOWN_BACKENDS: dict[str, str | None] = {
    "triton": "normlab.kernels.triton",
    "cpu": "normlab.kernels.cpu",
    REFERENCE: None,
}

#: Devices on which a backend is chosen without being asked for. Asked for explicitly, a backend's own
#: ``supports`` decides (the triton backend serves CPU tensors under ``TRITON_INTERPRET=1`` for tests).
DEFAULT_DEVICES: dict[str, tuple[str, ...]] = {"triton": ("cuda",), "cpu": ("cpu",)}

# A backend's ``supports(op, x, **options) -> bool`` says whether it serves this input
# (normlab.kernels.contract.supports).
Supports = Callable[..., bool]


@dataclass
class _Backend:
    name: str
    kernels: dict[str, Callable] = field(default_factory=dict)
    supports: Supports | None = None
    fronts: dict[str, Callable] = field(default_factory=dict)

    def serves(self, op: str) -> bool:
        """Whether it has the op itself (a native operator) or its ``op_fwd`` kernel."""
        return op in self.kernels or f"{op}_fwd" in self.kernels


_registry: dict[str, _Backend] = {REFERENCE: _Backend(REFERENCE)}
_load_errors: dict[str, str] = {}


class _Blocks(threading.local):
    """Per thread: the stack of ``with normlab.backend(...)`` names (always there, so reading it is cheap)."""

    def __init__(self):
        self.stack: list[str] = []


_local = _Blocks()
_decisions: dict[tuple, str] = {}


def register(backend: str, op: str, fn: Callable, *, supports: Supports | None = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of the kernel ``op`` (e.g. ``"rms_norm_fwd"``)."""
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(KNOWN_BACKENDS)}")
    entry = _registry.setdefault(backend, _Backend(backend))
    entry.kernels[op] = fn
    if supports is not None:
        entry.supports = supports
    _decisions.clear()


def register_kernels(backend: str, source, *, supports: Supports, names: tuple[str, ...]) -> None:
    """Register the attributes ``names`` of ``source`` (a backend module, or ``torch.ops.normlab``) as
    ``backend``'s; ``names`` come from :mod:`normlab.kernels.contract` (``contract.kernels(...)``,
    ``contract.native_ops(...)``), which states each one's signature."""
    for op in names:
        register(backend, op, getattr(source, op), supports=supports)


def _ensure_loaded(name: str) -> _Backend | None:
    """Import a backend's module on first use; ``None`` if it cannot be loaded here.

    While ``torch.compile`` traces, nothing is imported: only backends already loaded are used
    (an eager call, or :func:`available`, loads them)."""
    if name in _registry and (name == REFERENCE or _registry[name].kernels):
        return _registry[name]
    if name in _load_errors or torch.compiler.is_compiling():
        return None
    module = KNOWN_BACKENDS[name]
    try:
        importlib.import_module(module)  # registers its kernels
    except Exception as exc:  # noqa: BLE001 — a missing native build or triton, no GPU driver, …: any import failure
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        if name == "cpu":
            warnings.warn(
                f"normlab's cpu backend did not load ({_load_errors[name]}); the reference serves", stacklevel=3
            )
        return None
    return _registry.get(name)


def _check_name(name: str, where: str = "") -> str:
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}{where}; expected one of {sorted(KNOWN_BACKENDS)}")
    return name


# os.environ's own dict (bytes keys on POSIX): a look-up there costs a tenth of os.environ.get, on every call.
_environ_data, _ENV_KEY = (
    (os.environ._data, b"NORMLAB_BACKEND") if os.name == "posix" else (os.environ, "NORMLAB_BACKEND")
)


def requested_backend() -> str | None:
    """The backend forced by a ``with normlab.backend(...)`` block or ``NORMLAB_BACKEND``, if any."""
    stack = _local.stack
    if stack:
        return stack[-1]
    env = _environ_data.get(_ENV_KEY)
    if env and not isinstance(env, str):
        env = os.fsdecode(env)
    return _check_name(env, " in the environment variable NORMLAB_BACKEND") if env else None


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Compute every normlab op inside the block with backend ``name`` (falling back to reference)."""
    _check_name(name)
    stack = _local.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _serves(name: str, op: str, x: torch.Tensor, options: dict) -> bool:
    entry = _ensure_loaded(name)
    if entry is None or not entry.serves(op):
        return False
    return entry.supports is None or bool(entry.supports(op, x, **options))


def select(op: str, x: torch.Tensor, requested: str | None = None, **options) -> str:
    """Name of the backend that computes ``op`` (e.g. ``"rms_norm"``) for the input ``x`` (rows along its
    last dim) and the op's ``options``; cached per (op, device, dtypes, options). A backend's ``supports``
    is asked about the ``(rows, n)`` view.

    A backend's ``supports`` must not look at the number of rows: a row's result may not depend on
    the batch it came in (batch invariance)."""
    name = requested_backend() if requested is None else _check_name(requested)
    if torch.compiler.is_compiling():
        return _select(op, x, name, options)
    option_keys = [(v.dtype, v.device) if isinstance(v, torch.Tensor) else v for v in options.values()]
    key = (op, name, x.dtype, x.device, x.dim(), *option_keys)
    try:
        return _decisions[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable option: decide without caching
        return _select(op, x, name, options)
    decision = _decisions[key] = _select(op, x, name, options)
    return decision


#: :func:`cached_native`'s answer for a call not decided yet (or while torch.compile traces).
UNDECIDED = object()
_is_compiling = torch.compiler.is_compiling
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling


def cached_native(op: str, key: tuple, requested: str | None = None):
    """What :func:`native_for` answered for ``(op, key)`` under the backend this call asks for, or
    :data:`UNDECIDED`: a dictionary look-up, for an op front's common call. The backend's name is read as the
    call, the ``with normlab.backend()`` block or ``NORMLAB_BACKEND`` gives it, and checked when first decided."""
    if _is_dynamo_compiling():  # traced: no look-up in a global dictionary
        return UNDECIDED
    if requested is None:
        stack = _local.stack
        requested = stack[-1] if stack else _environ_data.get(_ENV_KEY)
    return _decisions.get((op, requested, key), UNDECIDED)


def native_for(op: str, key: tuple, x: torch.Tensor, requested: str | None = None, **options) -> Callable | None:
    """:func:`native` of the backend :func:`select` picks, cached under ``key``: what of the call determines the
    choice, as the caller builds it (dtypes and devices of ``x`` and of the tensor options, the other options).
    The whole choice of an op front's common call; :func:`cached_native` looks the answer up again.
    What it caches is the operator's overload itself (:func:`_direct`), which eager calls reach in one step."""
    if _is_compiling():
        name = requested_backend() if requested is None else _check_name(requested)
        return native(_select(op, x, name, options), op)
    if requested is None:
        stack = _local.stack
        raw = stack[-1] if stack else _environ_data.get(_ENV_KEY)
    else:
        raw = requested
    full = (op, raw, key)
    try:
        return _decisions[full]
    except KeyError:
        found = _decisions[full] = _direct(native(select(op, x, requested, **options), op))
        return found


def register_front(backend: str, op: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s front for ``op``'s common call: it takes the op's arguments as the op front
    passes them and returns the output, or None for a call it does not plainly serve (the op front's checks then
    take it). It takes only calls that the backend's ``supports`` serves on the backend's devices of
    :data:`DEFAULT_DEVICES`, which are the calls :func:`select` gives it when none is asked for."""
    _registry.setdefault(_check_name(backend), _Backend(backend)).fronts[op] = fn


def front(op: str, requested: str | None = None) -> Callable | None:
    """The front (:func:`register_front`) for ``op`` of the backend this call asks for, or without a request, of
    the cpu backend; None if it has none (or while torch.compile traces, which calls the operators themselves)."""
    if _is_dynamo_compiling():
        return None
    if requested is None:
        stack = _local.stack
        requested = stack[-1] if stack else _environ_data.get(_ENV_KEY)
    entry = _registry.get(_FRONT_OWNERS.get(requested))
    return None if entry is None else entry.fronts.get(op)


#: Whose front serves a call, by what it asks for: the call's, a block's or the environment's (bytes) backend name;
#: nothing, the cpu backend (the fronts take only their backend's default devices, and cpu's is the CPU).
_FRONT_OWNERS = {None: "cpu", **{key: name for name in KNOWN_BACKENDS for key in (name, os.fsencode(name))}}


def _direct(fn: Callable | None) -> Callable | None:
    """A ``torch.ops`` operator with one overload as that overload's own function (what ``OpOverload.__call__``
    calls: the same dispatcher call without the Python frames of the packet and the overload); else ``fn``."""
    if isinstance(fn, torch._ops.OpOverloadPacket) and fn.overloads() == ["default"]:
        return getattr(fn.default, "_op", fn)
    return fn


def _select(op: str, x: torch.Tensor, name: str | None, options: dict) -> str:
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    if name is not None:
        return name if name == REFERENCE or _serves(name, op, x, options) else REFERENCE
    for candidate in KNOWN_BACKENDS:
        if x.device.type in DEFAULT_DEVICES.get(candidate, ()) and _serves(candidate, op, x, options):
            return candidate
    return REFERENCE


def kernel(name: str, op: str) -> Callable:
    """The function registered by backend ``name`` for ``op``."""
    return _registry[name].kernels[op]


def native(name: str, op: str) -> Callable | None:
    """Backend ``name``'s whole op ``op`` (autograd included: a native operator), if it registered one under
    the family's own name; else None, and the op file wraps the backend's ``op_fwd``/``op_bwd`` kernels."""
    entry = _registry.get(name)
    return None if entry is None else entry.kernels.get(op)


def available() -> dict[str, str]:
    """Each known backend and whether it loads here (``"ok"`` or the reason it does not)."""
    out = {}
    for name in KNOWN_BACKENDS:
        entry = _ensure_loaded(name)
        out[name] = "ok" if entry is not None else _load_errors.get(name, "not registered")
    return out
