"""Long-run fuzzing of lmforge's file readers: GGUF, safetensors and config.json (issue 16).

    nice -n 19 python benchmarks/fuzz_readers.py [--formats gguf,safetensors,config] [--examples 100000]
                                                  [--minutes 30] [--seed 0] [--out benchmarks/output/fuzz]

The cases and the check are the test suite's (``tests/test_fuzz_readers.py``: structure-aware mutations of small
real files, then "parses, or fails with one LmforgeError naming the file, within HANG_SECONDS"), run here for
--examples inputs per format or --minutes per format, whichever ends first. Nothing stops at the first problem:
every crash (any other exception, or an error that is not one line naming the file) and every hang is counted,
and its input saved under --out for a regression test. Prints one line per format: inputs tried, parsed,
refused with an LmforgeError, crashes, hangs, the slowest input.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the cases live in the test suite, so both fuzz the same way
os.environ.setdefault("OMP_NUM_THREADS", "1")


class _TimeUp(Exception):
    """Ends a format's run when its minutes are spent (Hypothesis has no wall-clock budget of its own)."""


def fuzz(fmt: str, examples: int, minutes: float, seed: int, out: Path) -> dict[str, float]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from tests.test_fuzz_readers import CASES, try_input

    counts = {"inputs": 0, "ok": 0, "error": 0, "crash": 0, "hang": 0, "slowest_s": 0.0}
    deadline = time.monotonic() + 60 * minutes
    with TemporaryDirectory(prefix=f"lmforge-fuzz-{fmt}-") as tmp:

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],  # a long run wants breadth: no shrinking, no replaying
            suppress_health_check=list(HealthCheck),
        )
        @given(CASES[fmt]())
        def run(data: bytes) -> None:
            if time.monotonic() > deadline:
                raise _TimeUp
            outcome = try_input(fmt, data, Path(tmp))
            counts["inputs"] += 1
            counts[outcome.kind] += 1
            counts["slowest_s"] = max(counts["slowest_s"], outcome.seconds)
            if outcome.kind in ("crash", "hang"):
                digest = hashlib.sha256(data).hexdigest()[:16]
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{fmt}-{outcome.kind}-{digest}.bin").write_bytes(data)
                print(f"  {fmt} {outcome.kind}: {outcome.detail[:200]} (saved {digest})", flush=True)

        try:
            run()
        except _TimeUp:
            pass
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="gguf,safetensors,config")
    parser.add_argument("--examples", type=int, default=100_000, help="inputs per format")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "output" / "fuzz")
    args = parser.parse_args()
    for fmt in args.formats.split(","):
        start = time.monotonic()
        counts = fuzz(fmt, args.examples, args.minutes, args.seed, args.out)
        print(
            f"{fmt:12s} inputs {counts['inputs']:>8,}  parsed {counts['ok']:>7,}  refused {counts['error']:>8,}  "
            f"crashes {counts['crash']:>3}  hangs {counts['hang']:>3}  slowest {counts['slowest_s']:.3f} s  "
            f"({time.monotonic() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
