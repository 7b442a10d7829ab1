"""lmforge.runtime: intra-op threads (argument > $LMFORGE_THREADS > $OMP_NUM_THREADS > physical cores), the
home folder and inductor's cache, and LLM.load setting them up once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from lmforge import LLM, runtime
from lmforge.errors import LmforgeError

from .conftest import tiny_llm

# Two sockets, two cores each, two hyperthreads per core: 8 processors, 4 physical cores. Processors 0-3 are
# one thread of each core, 4-7 their siblings (Linux's usual numbering).
FAKE_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nphysical id\t: {(cpu % 4) // 2}\n"
    f"siblings\t: 4\ncore id\t\t: {cpu % 2}\ncpu cores\t: 2\nflags\t\t: fpu sse2 avx2"
    for cpu in range(8)
)


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    """Each test starts from a process that has set nothing up; threads and variables come back after it."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_threads", None)
    monkeypatch.setattr(runtime, "_configured", False)
    for name in (runtime.THREADS_ENV, "OMP_NUM_THREADS", runtime.INDUCTOR_CACHE_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(threads)


def test_physical_cores_counts_unique_socket_core_pairs() -> None:
    assert runtime.physical_cores(FAKE_CPUINFO, allowed=set(range(8))) == 4
    # Hyperthread siblings (0 and 4 share socket 0 core 0) are one core; affinity limits what counts.
    assert runtime.physical_cores(FAKE_CPUINFO, allowed={0, 4}) == 1
    assert runtime.physical_cores(FAKE_CPUINFO, allowed={0, 1, 2}) == 3


def test_physical_cores_is_unknown_without_topology() -> None:
    arm = "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\nBogoMIPS\t: 48.00\n"
    assert runtime.physical_cores(arm, allowed={0, 1}) is None
    assert runtime.physical_cores("", allowed=None) is None


def test_default_falls_back_to_cpu_count(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n", encoding="utf-8")
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert runtime.default_threads() == 3
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "missing")
    assert runtime.default_threads() == 3


def test_default_is_the_physical_cores(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(FAKE_CPUINFO, encoding="utf-8")
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert runtime.default_threads() == 4


def test_env_overrides_the_default_and_an_argument_overrides_both(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.set_threads() == 3 == torch.get_num_threads()
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert runtime.set_threads() == 2 == torch.get_num_threads()
    assert runtime.set_threads(1) == 1 == torch.get_num_threads()
    monkeypatch.setenv(runtime.THREADS_ENV, "zero")
    assert runtime.set_threads(1) == 1  # an explicit number never reads the variable


@pytest.mark.parametrize("value", [0, -2, 1.5, "four", True])
def test_invalid_argument_is_one_line(value) -> None:
    with pytest.raises(LmforgeError) as info:
        runtime.set_threads(value)
    assert "is not a number of threads" in str(info.value) and "\n" not in str(info.value) and info.value.hint


@pytest.mark.parametrize("value", ["0", "-1", "four", "2.5"])
def test_invalid_env_is_one_line(monkeypatch, value: str) -> None:
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    threads = torch.get_num_threads()
    with pytest.raises(LmforgeError) as info:
        runtime.set_threads()
    assert str(info.value).startswith(f"${runtime.THREADS_ENV}={value!r}") and "\n" not in str(info.value)
    assert torch.get_num_threads() == threads  # nothing changed


def test_a_nested_omp_setting_is_left_to_openmp(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    monkeypatch.setattr(runtime, "physical_cores", lambda: 1)
    assert runtime.default_threads() == 1


def test_home_and_compile_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(runtime.HOME_ENV, raising=False)
    assert runtime.lmforge_home() == Path("~/.lmforge").expanduser()
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))
    assert runtime.lmforge_home() == tmp_path / "home"
    assert runtime.configure_compile_cache() == tmp_path / "home" / "inductor"
    assert os.environ[runtime.INDUCTOR_CACHE_ENV] == str(tmp_path / "home" / "inductor")
    assert not (tmp_path / "home").exists()  # inductor makes it when it first compiles
    monkeypatch.setenv(runtime.INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert runtime.configure_compile_cache() == tmp_path / "mine"  # the user's choice stays


def test_compile_cache_falls_back_to_temp_where_home_cannot_be_made(monkeypatch, tmp_path: Path) -> None:
    # A user whose home is not writable (runuser -u nobody: HOME=/nonexistent) still compiles: a cache never
    # stops a command. A file where the home's parent folder should be stands in for "not writable" under root.
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "file" / "home"))
    monkeypatch.delenv(runtime.INDUCTOR_CACHE_ENV, raising=False)
    cache = runtime.configure_compile_cache()
    assert cache.parent == Path(tempfile.gettempdir()) and cache.name.endswith("-inductor")


def test_the_store_lives_in_the_same_home(monkeypatch, tmp_path: Path) -> None:
    from lmforge.store import Store

    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))
    assert Store().root == runtime.lmforge_home()


def test_llm_load_sets_up_once_and_keeps_the_users_threads(
    monkeypatch, tmp_path: Path, tiny_tokenizer
) -> None:
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "tiny")
    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "_initial_threads", 2)
    LLM.load(folder)
    assert torch.get_num_threads() == 1  # the default (here from the variable) on the first load
    assert os.environ[runtime.INDUCTOR_CACHE_ENV] == str(tmp_path / "home" / "inductor")
    torch.set_num_threads(2)
    LLM.load(folder)
    assert torch.get_num_threads() == 2  # once per process: a later load changes nothing

    monkeypatch.setattr(runtime, "_configured", False)
    runtime.set_threads(2)
    LLM.load(folder)
    assert torch.get_num_threads() == 2  # set_threads before the first load wins

    monkeypatch.setattr(runtime, "_configured", False)
    monkeypatch.setattr(runtime, "_threads", None)
    torch.set_num_threads(2)
    monkeypatch.setattr(runtime, "_initial_threads", 3)  # as if torch.set_num_threads ran after import
    LLM.load(folder)
    assert torch.get_num_threads() == 2


def test_an_invalid_env_fails_the_first_load(monkeypatch, tmp_path: Path, tiny_tokenizer) -> None:
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "tiny")
    monkeypatch.setenv(runtime.THREADS_ENV, "0")
    monkeypatch.setattr(runtime, "_initial_threads", torch.get_num_threads())
    with pytest.raises(LmforgeError, match="LMFORGE_THREADS"):
        LLM.load(folder)


RELEASE_SCRIPT = """
import time, psutil, torch
from lmforge import runtime

torch.set_num_threads(2)
me = psutil.Process()
x = torch.randn(1 << 22)
base = me.num_threads()


def extra() -> int:  # threads beyond the start, once OpenMP's come and go (they stop asynchronously)
    for _ in range(100):
        n = me.num_threads() - base
        if n == me.num_threads() - base:
            return n
        time.sleep(0.01)
    return n


x.exp()  # a parallel op: this thread's OpenMP team starts
team = extra()
released = runtime.release_openmp_threads()
time.sleep(0.1)
after = extra()
x.exp()
print(team, released, after, extra())
"""


def test_released_openmp_workers_stop_and_the_next_parallel_op_starts_them_again() -> None:
    """The calling thread's OpenMP workers (one more thread for 2 intra-op threads) stop; the next parallel op
    starts a team again. In a fresh process: the test process's threads have teams of their own."""
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120)
    team, released, after, again = map(int, out.stdout.split())
    assert (team, after, again) == (1, 0, 1) and released >= 1, out.stderr


def test_a_scheduler_starting_stops_the_callers_openmp_workers(monkeypatch, tiny_tokenizer) -> None:
    """The thread that starts a server's scheduler hands it the model: its own OpenMP team would keep the
    scheduler's from spinning between ops (``release_openmp_threads``)."""
    from lmforge.serve import scheduler as scheduling

    calls: list[str] = []
    monkeypatch.setattr(
        scheduling, "release_openmp_threads", lambda: calls.append(threading.current_thread().name)
    )
    scheduler = scheduling.Scheduler(tiny_llm("tiny-llama", tiny_tokenizer))
    scheduler.start()
    scheduler.close()
    assert calls == [threading.current_thread().name]
