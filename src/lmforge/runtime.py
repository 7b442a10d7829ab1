"""The process's runtime settings: intra-op threads, lmforge's home folder and torch.compile's cache.

``set_threads`` is the one place lmforge sets intra-op threads. The command line calls it once at start
(``lmforge --threads N``); ``LLM.load`` calls ``configure()`` once per process, which sets the default unless
the user chose already (``set_threads``, or ``torch.set_num_threads`` after importing lmforge). Threads, first
that applies: ``set_threads(n)``; ``$LMFORGE_THREADS``; ``$OMP_NUM_THREADS`` (what torch itself honours); the
physical cores this process may run on (a hyperthread sibling shares its core's arithmetic units, so more
threads only queue for them); ``os.cpu_count()`` where ``/proc/cpuinfo`` does not say.

``lmforge_home()`` is the one resolution of ``$LMFORGE_HOME`` (default ``~/.lmforge``; ``lmforge.home``, which
imports no torch, defines it): the model store lives there, and so does inductor's cache (``<home>/inductor``),
so only the first run waits for most of the compiling.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.home import HOME_ENV as HOME_ENV  # re-exported: runtime is where callers look for it
from lmforge.home import lmforge_home

THREADS_ENV = "LMFORGE_THREADS"
COMPILE_ENV = "LMFORGE_COMPILE"  # "0" / "false" / "no": decode eagerly unless a caller asks for compile
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
CPUINFO = Path("/proc/cpuinfo")
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_M_TOP_PAD = -2
_OMP_PAUSE_HARD = 2  # omp_pause_resource_t (omp.h): stop the threads and free their resources
HEAP_TOP_PAD = 32 << 20  # freed heap top kept for the next allocations (return_freed_memory_to_the_system)

_threads: int | None = None  # what set_threads set, None until it runs
_configured = False
_initial_threads = torch.get_num_threads()  # to see whether the user changed it before LLM.load


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None) -> int | None:
    """Unique (physical id, core id) pairs among the processors this process may run on, from ``cpuinfo``
    (default: ``/proc/cpuinfo``); ``allowed`` defaults to the process's CPU affinity. None when unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    if allowed is None and hasattr(os, "sched_getaffinity"):
        allowed = set(os.sched_getaffinity(0))
    cores: set[tuple[str, str]] = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "physical id" not in fields or "core id" not in fields:
            continue
        processor = fields.get("processor", "")
        if allowed is not None and processor.isdigit() and int(processor) not in allowed:
            continue
        cores.add((fields["physical id"], fields["core id"]))
    return len(cores) or None


def default_threads() -> int:
    """Threads when none are asked for: $LMFORGE_THREADS, $OMP_NUM_THREADS, physical cores, os.cpu_count()."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        return _positive(value, f"${THREADS_ENV}", hint="set it to a whole number >= 1 (e.g. 4), or unset it")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:  # anything else (a nested "4,2") is OpenMP's to read, not ours
        return int(omp)
    return physical_cores() or os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: ``default_threads()``) and return the number used."""
    global _threads
    threads = (
        default_threads() if n is None else _positive(n, "threads", hint="use a whole number >= 1, e.g. 4")
    )
    torch.set_num_threads(threads)
    _threads = threads
    return threads


def compile_by_default() -> bool:
    """Whether ``LLM.load`` compiles the decode step when not told: yes, unless ``$LMFORGE_COMPILE`` is 0/false/no
    (a machine without a C++ compiler, or a test run that should not wait for compiles)."""
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _can_create(path: Path) -> bool:
    """Whether ``path`` exists as a writable folder or could be made: its nearest existing ancestor is a folder
    this process may write into."""
    for folder in (path, *path.parents):
        if folder.exists():
            return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    return False


def configure_compile_cache() -> Path:
    """Point inductor's cache at ``<LMFORGE_HOME>/inductor`` unless ``$TORCHINDUCTOR_CACHE_DIR`` is set; return it.

    A cache must never stop a command: where the home folder cannot be created (a user whose ``$HOME`` is not
    writable, such as ``nobody``), the cache goes to a per-user folder in the temp directory instead. Either folder
    is created by inductor when it first compiles."""
    if not os.environ.get(INDUCTOR_CACHE_ENV):
        cache = lmforge_home() / "inductor"
        if not _can_create(cache):
            user = os.getuid() if hasattr(os, "getuid") else "user"
            cache = Path(tempfile.gettempdir()) / f"lmforge-{user}-inductor"
        os.environ[INDUCTOR_CACHE_ENV] = str(cache)
    return Path(os.environ[INDUCTOR_CACHE_ENV])


def return_freed_memory_to_the_system() -> bool:
    """Serve allocations over 1 MiB with their own mappings (glibc), which ``free`` returns to the system, and
    keep ``HEAP_TOP_PAD`` of the heap's free top instead of returning it after every free.

    Loading a model allocates and frees many buffers of a few MB (one tensor's codes at a time). glibc's default
    threshold rises to 32 MB after such frees, and those buffers then come from a heap that never shrinks: the
    bundled model's load left ~220 MB of freed memory in the process (``trim_heap`` after a load hands back the
    rest). The pad: with the threshold fixed, glibc returned the heap's top to the system whenever 128 KiB of it
    were free, and a forward pass's smaller temporaries faulted their pages in again each time: SmolLM2 Q8_0's
    prefill of 512 tokens ran at ~550 tok/s without it (2 threads, AMD EPYC, in a process
    that had decoded); ~870 with 32 MiB. 256 MiB gave ~1,000 but raised a compiled load's measured peak from
    ~590 to 650-720 MiB (a kept top is memory a later allocation elsewhere does not reuse). False where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20) and libc.mallopt(_M_TOP_PAD, HEAP_TOP_PAD))
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``): after a load, the small buffers
    one tensor's conversion freed (~20 MB for SmolLM2's head). False where the C library is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def release_openmp_threads() -> int:
    """Stop the OpenMP worker threads the calling thread started (libgomp's ``omp_pause_resource_all``); its
    next parallel op starts new ones. Returns how many OpenMP runtimes did (0 where none is libgomp, e.g.
    macOS, or none is loaded).

    A thread that hands model work to another calls it. Between two parallel ops, libgomp's workers spin for
    a few ms (what makes a decode step's ~400 small ops fast), but only while the process has no more of them
    than CPUs; past that they sleep at once and wake slowly. Every thread that runs a parallel op keeps a team
    of its own: the thread that loaded a model holds one after the load, a server's scheduler thread then
    starts a second, and on a 2-core machine one stream decoded at ~55 tok/s against ~130 in the loading
    thread (SmolLM2 Q4_1, 2 threads, AMD EPYC)."""
    paused = 0
    for path in _loaded_libraries("libgomp"):
        try:
            paused += ctypes.CDLL(path).omp_pause_resource_all(_OMP_PAUSE_HARD) == 0
        except (OSError, AttributeError):  # an OpenMP before 5.0
            pass
    return paused


def _loaded_libraries(name: str) -> set[str]:
    """Paths of the shared libraries whose file name contains ``name`` mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split(maxsplit=5)[5].strip() for line in maps if name in line.rpartition("/")[2]}
    except OSError:
        return set()


@functools.cache
def bf16_matmul_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): there a bf16 GEMM is several times
    faster than a float32 one; elsewhere PyTorch emulates bf16 and float32 is faster."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def configure() -> None:
    """Once per process (``LLM.load`` calls it): the compile cache, the heap's return of freed memory, and the
    default threads unless the user set them already, with ``set_threads`` or with ``torch.set_num_threads``
    after lmforge was imported."""
    global _configured
    if _configured:
        return
    configure_compile_cache()
    return_freed_memory_to_the_system()
    if _threads is None and torch.get_num_threads() == _initial_threads:
        set_threads()
    _configured = True


def _positive(value: object, what: str, hint: str) -> int:
    """``value`` as a thread count >= 1, or a one-line error."""
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
    if number is None or number < 1:
        raise LmforgeError(f"{what}={value!r} is not a number of threads", hint=hint)
    return number
