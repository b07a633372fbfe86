"""The one place pagedgen reads environment variables.

Every variable is prefixed ``PAGEDGEN_`` and read at call time (never cached
at import), so tests can ``monkeypatch.setenv`` freely. Other modules call
these functions instead of touching ``os.environ``.

============================  =====================  ===========================================
variable                      default                meaning
============================  =====================  ===========================================
``PAGEDGEN_CACHE_DIR``        ``~/.cache/pagedgen``  where converted models (GGUF -> float32) live
``PAGEDGEN_LOG_LEVEL``        ``INFO``               DEBUG, INFO, WARNING, ERROR or CRITICAL
``PAGEDGEN_API_KEY``          (none)                 ``pagedgen serve``'s API key when ``--api-key`` is not given
``PAGEDGEN_API_KEY_FILE``     (none)                 a file holding that key (a mounted Secret); not with the above
``PAGEDGEN_CPU_KERNELS``      ``1``                  build/use the native cpu kernels: decode attention, small-batch GEMM, fused decode ops (0: torch only)
``PAGEDGEN_CPU_KERNELS_DIR``  (cache dir/kernels)    where a prebuilt portable kernel library is looked for when there is no C compiler
``PAGEDGEN_CPU_ONEDNN``       ``0``                  1: cpu float32 products of more than 8 rows against oneDNN-prepacked weights (more memory)
============================  =====================  ===========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "PAGEDGEN_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# name -> (default as text, help); the single list of what pagedgen reads.
ENV_VARS: dict[str, tuple[str, str]] = {
    "PAGEDGEN_CACHE_DIR": ("~/.cache/pagedgen", "directory for converted model caches"),
    "PAGEDGEN_LOG_LEVEL": ("INFO", f"log level, one of {', '.join(LOG_LEVELS)}"),
    "PAGEDGEN_API_KEY": ("", "API key the server requires (gRPC and HTTP) when --api-key is not given"),
    "PAGEDGEN_API_KEY_FILE": ("", "file whose content (surrounding whitespace stripped) is that API key"),
    "PAGEDGEN_CPU_KERNELS": ("1", "build and use the native cpu kernels: decode attention, small-batch GEMM and fused decode ops (0: pure torch)"),
    "PAGEDGEN_CPU_KERNELS_DIR": ("", "directory of prebuilt portable cpu kernel libraries (backends.cpu.native.build_portable), used when there is no C compiler; empty: $PAGEDGEN_CACHE_DIR/kernels"),
    "PAGEDGEN_CPU_ONEDNN": ("0", "1: run the cpu backend's float32 products of more than 8 rows against oneDNN-prepacked weights (a second float32 copy of the weights, and oneDNN caches a kernel per row count: memory grows with the step shapes seen)"),
}


def _raw(name: str) -> str | None:
    """The variable's value, or None when unset or blank."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not a known pagedgen variable; add it to common.envs.ENV_VARS")
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def get_str(name: str) -> str:
    """A string variable, falling back to its documented default."""
    value = _raw(name)
    return ENV_VARS[name][0] if value is None else value


def get_int(name: str) -> int:
    """An integer variable; a malformed value raises with the variable's name."""
    text = get_str(name)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def get_bool(name: str) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case)."""
    text = get_str(name).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def cache_dir() -> Path:
    """``PAGEDGEN_CACHE_DIR`` with ``~`` expanded (not created here)."""
    return Path(get_str("PAGEDGEN_CACHE_DIR")).expanduser()


def api_key() -> str | None:
    """``PAGEDGEN_API_KEY``, else the content of ``PAGEDGEN_API_KEY_FILE``, else None.

    The file (e.g. a Kubernetes Secret mounted read-only) is read at call
    time, surrounding whitespace stripped. Setting both variables, an
    unreadable file or an empty one raises ValueError: a key that was meant
    to be there never silently turns authentication off.
    """
    key, path = _raw("PAGEDGEN_API_KEY"), _raw("PAGEDGEN_API_KEY_FILE")
    if path is None:
        return key
    if key is not None:
        raise ValueError("set PAGEDGEN_API_KEY or PAGEDGEN_API_KEY_FILE, not both")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"PAGEDGEN_API_KEY_FILE: cannot read {path!r}: {e}") from None
    if not text:
        raise ValueError(f"PAGEDGEN_API_KEY_FILE: {path!r} is empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"PAGEDGEN_API_KEY_FILE: {path!r} must hold one key without spaces or line breaks")
    return text


def log_level() -> str:
    """``PAGEDGEN_LOG_LEVEL`` upper-cased and checked against ``LOG_LEVELS``."""
    level = get_str("PAGEDGEN_LOG_LEVEL").upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"PAGEDGEN_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


@dataclass(frozen=True)
class Envs:
    """A snapshot of every variable, for code that wants them together."""

    cache_dir: Path
    log_level: str

    @classmethod
    def read(cls) -> "Envs":
        """Read the environment now."""
        return cls(cache_dir=cache_dir(), log_level=log_level())
