"""lmforge's own float32 CPU kernels, built on first use: a matvec over packed 4-bit weights
(``packed_matvec.cpp``) and a decode step's attention (``decode_attention.cpp``, see ``decode_attention``).

Why a kernel of our own: PyTorch's ``_weight_int4pack_mm_for_cpu`` (what ``lmforge.quant`` runs packed layers
through) takes bf16 activations, bf16 scales and returns bf16. Each rounding is up to 1/256 of a value, and on
SmolLM2 they put the packed path ~0.09 logits (RMS, over each position's 8 best) away from the fp32 path:
teacher-forced, the scales' rounding alone gave 0.044-0.065, the inputs' 0.049, the outputs' 0.06-0.087. Greedy
decoding then flipped near-ties (top-2 gaps of 0.001-0.05) in half the chat answers. Its float32 variant is
exact but ~10x slower. This kernel reads the same packed codes and each group's (scale, min) as fp16, the values
packed (a GGUF file's fp16 scales exactly), and multiplies in float32 with AVX2 (or AVX-512) FMA: it computes
with exactly the weight ``PackedLinear.dequantize`` returns, faster than the bf16 kernel for one row and up to
``quant.FLOAT32_ROWS`` rows (docs/architecture.md). A decode
step of one sequence runs its blocks and its output head through it, and so do a few rows (a prompt, a server's
batch: ``quant.FLOAT32_ROWS``) where it reads 64-row blocks (AVX-512), 4 at a time; elsewhere several rows keep
PyTorch's kernel, which tiles rows. Where the CPU has AVX512-BF16, a server's batch step can run in bf16 dot
products instead (``bf16_dot_products``, ``quant.PackedLinear.multiplies_in_bf16``).

It is C++ compiled here, once, with the compiler ``torch.compile`` needs anyway (``g++``); the library lands
beside inductor's cache (``lmforge.runtime.configure_compile_cache``) under a name that hashes its source, the
flags and the torch version. Where it does not run, packed layers keep PyTorch's kernel (the same results to
within bf16 rounding) and attention its torch ops (the same to float32 rounding): on a CPU without AVX2 or a
layout it does not read, silently; where it fails to build (no compiler), with one line on stderr saying why.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmforge import runtime

SOURCES = [Path(__file__).with_name(name) for name in ("packed_matvec.cpp", "decode_attention.cpp")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20"]
AVX512_FLAGS = ["-mavx512f", "-mavx512bw"]  # added where the CPU has them: vectors of 16 rows
BF16_FLAGS = ["-mavx512bf16", "-mavx512dq", "-mavx512vl"]  # and where it has AVX512-BF16: ``bf16_dot``
BLOCKS = (32, 64)  # rows per block of the "split" layouts the kernel reads (AVX2 and AVX-512 PyTorch builds)
BUILD_TIMEOUT_S = 300


@functools.cache
def available() -> bool:
    """Whether ``packed_matvec`` can run here: an x86 CPU with AVX2 and FMA, and the library built (or cached).
    Builds it on the first call of a process that finds no cached library (~20 s, once per machine)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        torch.ops.load_library(str(_library()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(
            f"warning: packed layers use PyTorch's bf16 kernel: lmforge's float32 one did not build ({reason})",
            file=sys.stderr,
        )
        return False
    torch.library.register_fake("lmforge::packed_matvec")(_shape_only)
    torch.library.register_fake("lmforge::decode_attention")(_attention_shape)
    torch.library.register_fake("lmforge::dequantize_rows")(_rows_shape)
    global _loaded
    _loaded = True
    return True


_loaded = (
    False  # the library is loaded (``available`` returned True): read inside compiled code, a plain flag
)


def _builds_bf16() -> bool:
    """Whether the library is built for AVX512-BF16 here (``BF16_FLAGS``)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()


@functools.cache
def bf16_dot_products() -> bool:
    """Whether ``packed_matvec(..., bf16=True)`` runs here: the library loaded, built for AVX512-BF16."""
    return _builds_bf16() and available()


def runs_decode_attention(q: torch.Tensor) -> bool:
    """Whether ``decode_attention`` takes a query like q: float32 on the CPU, once ``available`` loaded the
    library (``generate.decode_step_function`` asks before a model decodes on the CPU)."""
    return _loaded and q.device.type == "cpu" and q.dtype == torch.float32


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """One query per row: q (B, H, D), keys and values (B, K, L, D), allowed (B, L) bool -> (B, H * D) float32,
    softmax(q k^T / sqrt(D)) v over the allowed columns, grouped-query heads sharing their key/value head.

    ``decode_attention.cpp``: it reads each allowed column once and skips the others (a bucketed cache's
    unwritten columns cost nothing). It reads the strides of k, v and allowed (a slice of a cache's columns,
    keys laid out as a projection's); k and v whose D values are not contiguous are copied first."""
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    return torch.ops.lmforge.decode_attention(q.contiguous(), k, v, allowed)


def packed_matvec(
    x: torch.Tensor,
    packed: torch.Tensor,
    exact_bits: torch.Tensor,
    block: int,
    rows: int,
    planes: int = 1,
    bf16: bool = False,
) -> torch.Tensor:
    """x (M, K) float32 @ the first ``rows`` rows of a packed weight -> (M, rows) float32.

    ``packed`` (>= rows, P*K/2) uint8 in the "split" layout of ``block`` rows, ``planes`` P: 1 (int4) or 2 (int8:
    the high nibbles' K columns, then the low ones'); ``exact_bits`` (>= rows/16, P*K/32, 2, 16): the fp16 bits
    (as int16) of each group's scale and min, tile of 16 rows by tile (``lmforge.quant.PackedLinear``),
    contiguous. ``rows``: whole blocks. ``bf16`` (where ``bf16_dot_products``; 64-row blocks): x rounded to bf16,
    the weights exact, two products an instruction summed in float32 (a server's batch steps:
    ``quant.PackedLinear.multiplies_in_bf16``)."""
    return torch.ops.lmforge.packed_matvec(x, packed, exact_bits, block, rows, planes, bf16)


def dequantize_rows(
    packed: torch.Tensor,
    exact_bits: torch.Tensor,
    block: int,
    planes: int,
    start: int,
    stop: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rows start..stop (whole blocks) of a packed weight, transposed: (K, stop - start) float32, or bf16 rounded
    once from them: the values packed (``PackedLinear.dequantize``), planes summed. What a long prompt's GEMM
    multiplies by: one pass over the codes, where unpacking them with torch ops and scaling took ~5 passes
    (SmolLM2's prefill of 512 tokens spent ~0.67 s of ~1.4 s doing that). Transposed, as a block stores its codes
    column by column; a GEMM takes the transposed operand as it is.
    """
    return torch.ops.lmforge.dequantize_rows(
        packed, exact_bits, block, planes, start, stop, dtype == torch.bfloat16
    )


def _shape_only(
    x: torch.Tensor,
    packed: torch.Tensor,
    exact_bits: torch.Tensor,
    block: int,
    rows: int,
    planes: int,
    bf16: bool,
) -> torch.Tensor:
    """What torch.compile needs to trace a call: the output's shape and type."""
    return x.new_empty(x.shape[0], rows)


def _rows_shape(
    packed: torch.Tensor, exact_bits: torch.Tensor, block: int, planes: int, start: int, stop: int, bf16: bool
) -> torch.Tensor:
    dtype = torch.bfloat16 if bf16 else torch.float32
    return packed.new_empty(packed.shape[1] * 2 // planes, stop - start, dtype=dtype)


def _attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _library() -> Path:
    """The built library's path: from the cache, or compiled now under a lock (one build for all processes)."""
    from filelock import FileLock

    flags = list(FLAGS)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        flags += AVX512_FLAGS + (BF16_FLAGS if _builds_bf16() else [])
    key = hashlib.sha256(
        b"\0".join([*(s.read_bytes() for s in SOURCES), " ".join(flags).encode(), torch.__version__.encode()])
    ).hexdigest()[:16]
    folder = runtime.configure_compile_cache() / "lmforge-kernels"
    for path in (folder.parent, folder):  # made private when made here (inductor writes to the first too)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder.parent, folder)
    target = folder / f"lmforge_kernels-{key}.so"
    with FileLock(str(folder / f"{target.name}.lock")):
        if target.exists():
            _check_private(target)
            return target
        print("building lmforge's float32 CPU kernels (once, ~20 s)", file=sys.stderr)
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            compile_library(SOURCES, flags, Path(scratch))
            os.replace(scratch, target)  # whole or not at all: another process never loads half a library
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    return target


def compile_library(sources: list[Path], flags: list[str], target: Path) -> None:
    """g++ ``sources`` with ``flags`` into the shared library ``target``, against this torch (its C++ ABI)."""
    from torch.utils import cpp_extension

    try:
        subprocess.run(
            [
                "g++",
                *flags,
                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                *(f"-I{p}" for p in cpp_extension.include_paths()),
                *(str(s) for s in sources),
                "-o",
                str(target),
                *(f"-L{p}" for p in cpp_extension.library_paths()),
                "-lc10",
                "-ltorch_cpu",
                "-ltorch",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as e:
        raise RuntimeError(e.stderr.strip() or "g++ failed") from e


def _check_private(*paths: Path) -> None:
    """A library is code this process runs: load one only where no other user could have put it (a cache in a
    shared temp folder, say), so each path must be this user's and not writable by everyone."""
    if not hasattr(os, "getuid"):
        return
    for path in paths:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o002:
            raise RuntimeError(f"{path} belongs to another user or everyone can write to it")
