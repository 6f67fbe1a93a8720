"""JAX's persistent compilation cache for jaxbp runs: compiled programs kept on disk.

A rerun of ``jaxbp train`` (or any process that calls :func:`enable` on the same folder)
loads the XLA executables of the same programs instead of compiling them again. The
cache is JAX's own (``jax_compilation_cache_dir``); enabling it is process-wide.
"""

from __future__ import annotations

import os
import pathlib

import filelock
import jax

from jaxbp import files

ENV = "JAXBP_COMPILATION_CACHE"
"""Environment variable naming the cache folder (``off`` disables it)."""
DEFAULT = pathlib.Path("~/.cache/jaxbp/xla")
OFF = ("off", "none", "")
MAX_BYTES = 4 * 2**30
"""The cache's size bound: past it the least recently used programs are dropped. A bound
also makes JAX take a file lock around every read and write of the folder, so that
processes sharing it (two runs, xdist workers) never read an entry another is still
writing (unbounded, JAX writes entries in place without a lock: a torn read is warned
about and compiled again)."""


def default_dir() -> str:
    """``$JAXBP_COMPILATION_CACHE``, else ``~/.cache/jaxbp/xla``."""
    return os.environ.get(ENV, str(DEFAULT))


def enable(path: str | os.PathLike[str] | None,
           name: str = "compilation cache") -> pathlib.Path | None:
    """Keep compiled programs in ``path`` (created if missing) from now on, every program
    whatever its compile time, up to :data:`MAX_BYTES` (least recently used dropped
    first); ``None`` or ``"off"`` leaves JAX's setting as it is.

    Returns:
      The folder in use, or None.

    Raises:
      ValueError: ``path`` exists and is not a folder, or cannot be created (the message
        names it as ``name``).
    """
    if path is None or str(path).strip().lower() in OFF:
        return None
    folder = files.make_folder(name, pathlib.Path(path).expanduser())
    adopt_unbounded_entries(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder


def adopt_unbounded_entries(folder: pathlib.Path) -> int:
    """Give each entry an unbounded writer left in ``folder`` (a jaxbp before the bound,
    or any JAX process without ``jax_compilation_cache_max_size``) the access time that
    JAX's bounded cache keeps beside an entry: its file's mtime. JAX's eviction reads one
    for every entry before each write, so a single entry without one makes every later
    write fail ("Error writing persistent compilation cache entry": nothing more is
    cached). Under JAX's own lock file; returns how many entries were adopted.

    The names (``<key>-cache``, ``<key>-atime``, ``.lockfile``) are those of JAX's
    ``jax._src.lru_cache``; where they change, nothing is found and nothing is done.
    """
    adopted = 0
    with filelock.FileLock(folder / ".lockfile", timeout=60):
        for entry in folder.glob("*-cache"):
            atime = entry.with_name(entry.name.removesuffix("-cache") + "-atime")
            if not atime.exists():
                atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
                adopted += 1
    return adopted
