"""File readers never trust a header (issue 16): every size a GGUF, safetensors or JSON file declares is checked
against the file and the caps in ``lmforge.limits`` before anything is allocated or built.

Hypothesis mutates small real files (written by lmforge's own GGUF writer and by safetensors) field by field:
counts, string lengths, tensor dimensions, types and offsets, metadata value types, the alignment, header
lengths, plus random bytes and truncation. Each input must parse or fail with one ``LmforgeError`` naming the
file, within a time bound. The CI run here is seeded and small; ``benchmarks/fuzz_readers.py`` runs the same
cases for as long as it is given.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lmforge.store
from lmforge import LLM, Config, limits
from lmforge.errors import LmforgeError
from lmforge.formats.gguf import GGUFFile
from lmforge.formats.gguf_writer import write_gguf
from lmforge.formats.hf import read_safetensors
from lmforge.formats.peft import load_adapter
from lmforge.model import Transformer
from lmforge.store import Store
from tests.conftest import tiny_llm, train_tiny_tokenizer

# An input that takes longer than this is a hang (the files are a few kB; a real parse takes milliseconds).
HANG_SECONDS = 5.0
CI_EXAMPLES = 150  # per format: the three fuzz tests together stay well under a minute on one thread


# ------------------------------------------------------------------------------------------------ seed files
def tiny_config(vocab_size: int) -> Config:
    return Config.from_name(
        "tiny-llama", vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
        intermediate_size=64,
    )  # fmt: skip


@cache
def gguf_seeds() -> tuple[bytes, ...]:
    """Real GGUF files: lmforge's writer at f32 and q8_0 (a tiny Llama with a byte-level BPE vocabulary), and a
    hand-built one with an explicit general.alignment and metadata of every value type."""
    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer(vocab_size=300)
    config = tiny_config(tokenizer.vocab_size)
    state = Transformer(config).state_dict()
    seeds = []
    with tempfile.TemporaryDirectory(prefix="lmforge-fuzz-seed-") as tmp:
        for file_type in ("f32", "q8_0"):
            path = write_gguf(
                Path(tmp) / f"seed-{file_type}.gguf", config, state, tokenizer, file_type=file_type
            )
            seeds.append(path.read_bytes())
    seeds.append(
        gguf_bytes(
            [
                ("general.architecture", 8, "llama"),
                ("general.alignment", 4, 64),
                ("general.name", 8, "小模型"),
                ("u8", 0, 7), ("i8", 1, -7), ("u16", 2, 7), ("i16", 3, -7), ("i32", 5, -7), ("f32", 6, 0.5),
                ("bool", 7, 1), ("u64", 10, 7), ("i64", 11, -7), ("f64", 12, 0.25),
                ("ints", 9, (5, [1, 2, 3])),
                ("words", 9, (8, ["床前", "明月光"])),
                ("nested", 9, (9, [(4, [1, 2]), (8, ["x"])])),
            ],
            [("token_embd.weight", [4, 2], 0, struct.pack("<8f", *range(8))), ("output_norm.weight", [4], 0, b"\0" * 16)],
            alignment=64,
        )
    )  # fmt: skip
    return tuple(seeds)


_SCALAR_PACK = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<B",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _gguf_value(vtype: int, value: Any) -> bytes:
    if vtype == 8:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == 9:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_gguf_value(item_type, v) for v in items)
    return struct.pack(_SCALAR_PACK.get(vtype, "<I"), value)  # an unknown type gets 4 bytes of value


def gguf_bytes(
    kvs: list[tuple[str, int, Any]],
    tensors: list[tuple[str, list[int], int, bytes]],
    alignment: int = 32,
    version: int = 3,
) -> bytes:
    """A GGUF file from parts: (key, value type, value) pairs and (name, dims in GGUF order, type, data) tensors."""
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        header += _gguf_value(8, key) + struct.pack("<I", vtype) + _gguf_value(vtype, value)
    data, offsets = b"", []
    for *_, blob in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += blob
    for (name, dims, qtype, _), offset in zip(tensors, offsets, strict=True):
        header += _gguf_value(8, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)
    return header + b"\0" * (-len(header) % alignment) + data


@dataclass(frozen=True)
class Field:
    offset: int
    fmt: str
    label: str


def gguf_fields(buf: bytes) -> list[Field]:
    """Every integer and float field of a valid GGUF header: counts, string lengths, value types, values, tensor
    dimensions, types and offsets (what a structure-aware mutation changes)."""
    fields: list[Field] = []
    pos = 4

    def take(fmt: str, label: str) -> int:
        nonlocal pos
        fields.append(Field(pos, fmt, label))
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string(label: str) -> str:
        nonlocal pos
        n = take("<Q", f"{label} length")
        pos += n
        return buf[pos - n : pos].decode()

    def value(vtype: int, label: str) -> None:
        if vtype == 8:
            string(label)
        elif vtype == 9:
            item_type = take("<I", f"{label} item type")
            for i in range(take("<Q", f"{label} count")):
                value(item_type, f"{label}[{i}]")
        else:
            take(_SCALAR_PACK[vtype], label)

    take("<I", "version")
    n_tensors, n_kv = take("<Q", "tensor count"), take("<Q", "metadata count")
    for _ in range(n_kv):
        key = string("key")
        value(take("<I", f"{key} type"), key)
    for _ in range(n_tensors):
        name = string("tensor name")
        for i in range(take("<I", f"{name} dimensions")):
            take("<Q", f"{name} dim {i}")
        take("<I", f"{name} type")
        take("<Q", f"{name} offset")
    return fields


@cache
def gguf_seed_fields() -> tuple[tuple[Field, ...], ...]:
    return tuple(tuple(gguf_fields(seed)) for seed in gguf_seeds())


@cache
def safetensors_seed() -> bytes:
    """A small safetensors file with tensors of several dtypes and a metadata map."""
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.float16),
        "c": torch.zeros(2, 2, dtype=torch.bfloat16),
        "d": torch.arange(3, dtype=torch.int64),
        "e": torch.tensor([1, 0, 1], dtype=torch.bool),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "说明": "小"})
        return path.read_bytes()


# ------------------------------------------------------------------------------------------------- mutations
# Integer values that break parsers: zero, off-by-ones, powers of two at type boundaries, a million.
INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 31, 32, 33, 63, 64, 255, 256, 1023, 1024, 4096, 65535, 65536,
               10**6, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip


def _put(buf: bytearray, field: Field, value: int) -> None:
    """Store ``value`` (wrapped to the field's width) as the field's bytes; a float field gets it as a bit pattern,
    so NaNs and infinities come up too."""
    size = struct.calcsize(field.fmt)
    buf[field.offset : field.offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")


raw_bytes_mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 2**32), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 2**32), st.just(0)),
)


@st.composite
def gguf_case(draw: st.DrawFn) -> bytes:
    """A real GGUF file with one to four mutations: header fields set to interesting or random values, bytes
    overwritten, the file cut short."""
    which = draw(st.integers(0, len(gguf_seeds()) - 1))
    buf, fields = bytearray(gguf_seeds()[which]), gguf_seed_fields()[which]
    field_mutation = st.tuples(
        st.just("field"),
        st.integers(0, len(fields) - 1),
        st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1), st.integers(-3, 3)),
    )
    cut = None
    for kind, where, value in draw(
        st.lists(st.one_of(field_mutation, raw_bytes_mutation), min_size=1, max_size=4)
    ):
        if kind == "field":
            field = fields[where]
            old = int.from_bytes(buf[field.offset : field.offset + struct.calcsize(field.fmt)], "little")
            _put(buf, field, old + value if -3 <= value <= 3 else value)
        elif kind == "byte":
            buf[where % len(buf)] = value
        else:
            cut = where % len(buf)
    return bytes(buf[:cut] if cut is not None else buf)


json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(INTERESTING) | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(["F32", "F16", "BF16", "I64", "十二"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@st.composite
def safetensors_case(draw: st.DrawFn) -> bytes:
    """The seed safetensors file with its header edited (a tensor's dtype, shape or offsets replaced, a key
    dropped, the header length lying) and then raw bytes overwritten or the file cut short."""
    seed = safetensors_seed()
    (n,) = struct.unpack_from("<Q", seed)
    header, data = json.loads(seed[8 : 8 + n]), seed[8 + n :]
    names = sorted(header)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if name == "__metadata__" or key is None:
            header[name] = draw(json_values)
        elif draw(st.booleans()) and isinstance(header[name], dict):
            header[name].pop(key, None)
        elif isinstance(header[name], dict):
            header[name][key] = draw(
                json_values
                | st.lists(st.sampled_from(INTERESTING), max_size=3)
                | st.tuples(st.sampled_from(INTERESTING), st.sampled_from(INTERESTING)).map(list)
            )
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode()
    length = draw(st.sampled_from([len(raw)] * 4 + INTERESTING))
    buf = bytearray(struct.pack("<Q", length % 2**64) + raw + data)
    for kind, where, value in draw(st.lists(raw_bytes_mutation, max_size=2)):
        if not buf:
            break
        if kind == "byte":
            buf[where % len(buf)] = value
        else:
            buf = buf[: where % len(buf)]
    return bytes(buf)


@st.composite
def config_case(draw: st.DrawFn) -> bytes:
    """A real config.json with values replaced by arbitrary JSON (wrong types, huge numbers, Chinese text)."""
    hf = tiny_config(300).to_hf()
    for key in draw(st.lists(st.sampled_from(sorted(hf)), max_size=4)):
        if draw(st.booleans()):
            hf.pop(key, None)
        else:
            hf[key] = draw(json_values)
    return json.dumps(hf, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------- the readers
def read_gguf(path: Path) -> None:
    """Everything lmforge reads from a GGUF before building a network: header, config, tokenizer, weights."""
    gguf_file = GGUFFile(path)
    config = gguf_file.config()
    gguf_file.tokenizer()
    gguf_file.state_dict(config, quant="auto")


def read_config(path: Path) -> None:
    Config.load(path)


READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "gguf": ("model.gguf", read_gguf),
    "safetensors": ("model.safetensors", read_safetensors),
    "config": ("config.json", read_config),
}
CASES = {"gguf": gguf_case, "safetensors": safetensors_case, "config": config_case}


@dataclass
class Outcome:
    kind: str  # "ok", "error" (an LmforgeError), "crash" (anything else), "hang" (over HANG_SECONDS)
    seconds: float
    detail: str = ""


def try_input(fmt: str, data: bytes, folder: Path) -> Outcome:
    """Write ``data`` to a fresh file in ``folder`` and read it as ``fmt``."""
    name, reader = READERS[fmt]
    # A fresh name each time: a reader may still map the previous file, and rewriting a mapped file in place
    # would fault that mapping.
    path = folder / f"{time.perf_counter_ns()}-{name}"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        reader(path)
        kind, detail = "ok", ""
    except LmforgeError as e:
        kind, detail = "error", str(e)
        if "\n" in e.message or str(path) not in e.message:
            kind, detail = "crash", f"error not one line naming the file: {e}"
    except Exception as e:  # noqa: BLE001 — anything but LmforgeError is the bug this fuzzer looks for
        kind, detail = "crash", f"{type(e).__name__}: {e}"
    finally:
        path.unlink()
    seconds = time.perf_counter() - start
    if seconds > HANG_SECONDS:
        kind, detail = "hang", f"{seconds:.1f} s"
    return Outcome(kind, seconds, detail)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz")


CI_SETTINGS = settings(
    max_examples=CI_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_fuzzed_files_parse_or_fail_with_one_error(fmt, fuzz_dir, one_thread):
    seen: dict[str, int] = {}

    @CI_SETTINGS
    @given(CASES[fmt]())
    def check(data: bytes) -> None:
        outcome = try_input(fmt, data, fuzz_dir)
        seen[outcome.kind] = seen.get(outcome.kind, 0) + 1
        assert outcome.kind in ("ok", "error"), f"{outcome.kind}: {outcome.detail}"

    check()
    assert seen.get("error", 0) > CI_EXAMPLES // 10  # the mutations do reach the checks


def test_seeds_parse(fuzz_dir):
    """The unmutated seeds are valid files: every failure in the fuzz tests comes from a mutation."""
    for seed in gguf_seeds()[:2]:
        assert try_input("gguf", seed, fuzz_dir).kind == "ok"
    assert try_input("safetensors", safetensors_seed(), fuzz_dir).kind == "ok"
    assert try_input("config", json.dumps(tiny_config(300).to_hf()).encode(), fuzz_dir).kind == "ok"
    # The hand-built seed holds no model, but its header parses:
    path = fuzz_dir / "handmade.gguf"
    path.write_bytes(gguf_seeds()[2])
    gguf_file = GGUFFile(path)
    assert gguf_file.metadata["general.name"] == "小模型"
    assert gguf_file.metadata["nested"] == [[1, 2], ["x"]]
    assert [t.name for t in gguf_file.tensors] == ["token_embd.weight", "output_norm.weight"]


# ------------------------------------------------------------------------------------------ specific findings
def _fails_fast(call: Callable[[], Any], path: Path, seconds: float, max_bytes: int) -> str:
    """``call`` raises one LmforgeError naming ``path`` within ``seconds``, allocating under ``max_bytes``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(LmforgeError) as info:
            call()
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = info.value.message
    assert str(path) in message and "\n" not in message, message
    assert elapsed < seconds, f"{elapsed:.3f} s: {message}"
    assert peak < max_bytes, f"{peak:,} bytes allocated: {message}"
    return message


def _gguf_patched(seed: bytes, label: str, value: int) -> bytes:
    (field,) = [f for f in gguf_fields(seed) if f.label == label]
    buf = bytearray(seed)
    _put(buf, field, value)
    return bytes(buf)


HUGE_FILES = {
    # 16 bytes: the magic, version 3 and a claim of 2^40 tensors.
    "gguf-16-bytes": ("claim.gguf", b"GGUF" + struct.pack("<IQ", 3, 2**40), GGUFFile),
    # One F32 tensor of 2^20 x 2^20 = 2^40 elements, and no data.
    "gguf-2^40-elements": (
        "huge.gguf",
        gguf_bytes([("general.architecture", 8, "llama")], [("token_embd.weight", [2**20, 2**20], 0, b"")]),
        GGUFFile,
    ),
    "safetensors-2^40-elements": (
        "huge.safetensors",
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
        ),
        read_safetensors,
    ),
}


@pytest.mark.parametrize("case", sorted(HUGE_FILES))
def test_a_tiny_file_claiming_2_40_elements_fails_in_100_ms_and_10_mb(case, tmp_path):
    name, data, reader = HUGE_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    _fails_fast(lambda: reader(path), path, seconds=0.1, max_bytes=10 * limits.MiB)


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        ("llama.block_count", 10**6, "n_layer=1000000 is out of range"),
        ("llama.block_count", 3, "declares 3 layers, but the file holds 2 layers' tensors"),
        ("llama.embedding_length", 64, "but the token embedding is 300 x 32"),
        ("llama.context_length", 2**31, "block_size=2147483648 is out of range"),
        ("tensor count", 2**40, "declares 1,099,511,627,776 tensors"),
    ],
)
def test_llm_load_of_a_gguf_declaring_more_than_it_holds_fails_fast(label, value, message, tmp_path):
    path = tmp_path / "liar.gguf"
    path.write_bytes(_gguf_patched(gguf_seeds()[0], label, value))
    LLM.load(
        gguf_writer_seed_path(tmp_path), device="cpu"
    )  # the unpatched file loads (and warms up LLM.load)
    assert message in _fails_fast(
        lambda: LLM.load(path, device="cpu"), path, seconds=1.0, max_bytes=100 * limits.MiB
    )


def gguf_writer_seed_path(folder: Path) -> Path:
    path = folder / "seed.gguf"
    path.write_bytes(gguf_seeds()[0])
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (10**6, "n_layer=1000000 is out of range"),
        (3, "declares 3 layers, but the file holds 2 layers' tensors"),
        ("十二", "n_layer='十二' is out of range"),
        (None, "n_layer=None is out of range"),
    ],
)
def test_llm_load_of_a_folder_whose_config_lies_fails_fast(value, message, tmp_path, tiny_tokenizer):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "liar")
    config_path = folder / "config.json"
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    hf["num_hidden_layers"] = value
    config_path.write_text(json.dumps(hf, ensure_ascii=False), encoding="utf-8")
    assert message in _fails_fast(
        lambda: LLM.load(folder, device="cpu"), config_path, seconds=1.0, max_bytes=100 * limits.MiB
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "not a valid config.json"),  # nested past Python's recursion limit
        ('["一个列表"]', "a JSON list, not an object"),
        ('{"model_type": "llama", "vocab_size": "大"}', "missing key"),
        ('{"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 0, '
         '"hidden_size": 8, "intermediate_size": 8}', "malformed value (ZeroDivisionError"),
        ('{"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 2, '
         '"hidden_size": 8, "intermediate_size": 8, "rope_scaling": "线性"}', "rope_scaling='线性' is not an object"),
        ("\xff\xfe", "not a valid config.json"),
        # Found by the fuzzer before the fix: the error did not name the file.
        ('{"model_type": null}', "unsupported architecture: model_type=None"),
    ],
)  # fmt: skip
def test_a_damaged_config_json_is_one_error_naming_it(text, message, tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8") if text != "\xff\xfe" else b"\xff\xfe{}")
    assert message in _fails_fast(lambda: Config.load(path), path, seconds=1.0, max_bytes=100 * limits.MiB)


def test_json_side_files_are_capped_before_they_are_read(tmp_path, monkeypatch, tiny_tokenizer):
    folder = tiny_llm("tiny-llama", tiny_tokenizer).save(tmp_path / "m")
    monkeypatch.setattr(limits, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(LmforgeError, match=r"config\.json: .* over the 100-byte limit for a config\.json"):
        LLM.load(folder, device="cpu")
    monkeypatch.undo()
    monkeypatch.setattr(limits, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(
        LmforgeError, match=r"tokenizer\.json: .* over the 1,000-byte limit for a tokenizer\.json"
    ):
        LLM.load(folder, device="cpu")


def test_a_safetensors_header_over_the_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # a sparse file: larger than the cap, without writing it
        f.write(struct.pack("<Q", limits.MAX_SAFETENSORS_HEADER_BYTES + 1))
        f.truncate(limits.MAX_SAFETENSORS_HEADER_BYTES + 1000)
    message = _fails_fast(lambda: read_safetensors(path), path, seconds=0.1, max_bytes=10 * limits.MiB)
    assert "headers are capped at 100,000,000" in message


@pytest.mark.parametrize(
    ("kvs", "tensors", "message"),
    [
        ([("general.alignment", 4, 0)], [], "general.alignment 0 is not a power of two"),
        ([("general.alignment", 4, 48)], [], "general.alignment 48 is not a power of two"),
        ([("general.alignment", 10, 2**40)], [], "is not a power of two up to 1,048,576"),
        ([("general.alignment", 8, "三十二")], [], "general.alignment '三十二'"),
        ([("x", 13, 0)], [], "unknown metadata value type 13"),
        ([("x", 9, (9, [(9, [(4, [1])])]))], [], "arrays nested deeper than 2 levels"),
        ([("键", 4, 1), ("键", 4, 2)], [], "metadata key '键' appears twice"),
        ([], [("t", [1, 1, 1, 1, 1], 0, b"\0" * 4)], "tensor t has 5 dimensions"),
        ([], [("t", [4, 0], 0, b"")], "tensor t has an empty dimension"),
        ([], [("t", [4], 0, b"\0" * 16), ("t", [4], 0, b"\0" * 16)], "tensor t appears twice"),
        ([], [("t", [4], 99, b"\0" * 16)], "unknown GGML type id 99"),
        ([], [("t", [33], 8, b"\0" * 34)], "not a multiple of the Q8_0 block size 32"),
    ],
)
def test_gguf_header_values_are_checked(kvs, tensors, message, tmp_path):
    path = tmp_path / "damaged.gguf"
    path.write_bytes(gguf_bytes(kvs, tensors))
    assert message in _fails_fast(lambda: GGUFFile(path), path, seconds=0.1, max_bytes=10 * limits.MiB)


def test_gguf_tensor_offsets_must_be_aligned_and_inside_the_file(tmp_path):
    seed = gguf_seeds()[2]
    path = tmp_path / "offsets.gguf"
    path.write_bytes(_gguf_patched(seed, "output_norm.weight offset", 65))
    with pytest.raises(LmforgeError, match="starts at offset 65, not a multiple of 64"):
        GGUFFile(path)
    path.write_bytes(_gguf_patched(seed, "output_norm.weight offset", 2**40))
    with pytest.raises(LmforgeError, match="truncated GGUF file .tensor output_norm.weight ends at byte"):
        GGUFFile(path)


def test_a_store_manifest_is_capped(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    store = Store()
    path = store.manifests / "big" / "latest.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps({"files": {}, "description": "很长" * 1000}, ensure_ascii=False), encoding="utf-8"
    )
    monkeypatch.setattr(lmforge.store, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(LmforgeError, match=r"latest\.json: damaged manifest .*over the 1,000-byte limit"):
        store.get("big")


def test_a_lora_adapter_config_is_bounded_before_layers_are_injected(tmp_path, tiny_tokenizer):
    llm = tiny_llm("tiny-llama", tiny_tokenizer)
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 10**9, "lora_alpha": 16}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    path = folder / "adapter_config.json"
    message = _fails_fast(
        lambda: load_adapter(llm.model, folder), path, seconds=1.0, max_bytes=10 * limits.MiB
    )
    assert "r (1 to 65536)" in message
    assert not any("lora" in name for name in llm.model.state_dict())  # nothing was injected


def _safetensors(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("header", "message"),
    [
        # Found by the fuzzer: a list as the dtype raised TypeError (unhashable) from the dtype lookup.
        ({"w": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}, "tensor 'w' has dtype []"),
        ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "tensor 'w' has dtype 'C64'"),
        ({"权重": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "tensor '权重' has shape [-1]"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}, "outside the 4 data bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8 bytes, its offsets give 4"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets [4, 0]"),
        ({"__metadata__": {"格式": 1}}, "__metadata__ is not a map of strings"),
        ({"w": "F32"}, "tensor 'w' has no description"),
    ],
)
def test_safetensors_header_entries_are_checked(header, message, tmp_path):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(_safetensors(header, b"\0" * 4))
    assert message in _fails_fast(
        lambda: read_safetensors(path), path, seconds=0.1, max_bytes=10 * limits.MiB
    )


@pytest.mark.parametrize(
    ("label", "value", "message"),
    [
        # Found by the fuzzer before the fix: metadata errors that did not name the file.
        ("llama.embedding_length type", 13, "unknown metadata value type 13"),
        ("general.architecture length", 2**40, "declares 1,099,511,627,776 string bytes"),
        ("llama.block_count type", 8, "damaged GGUF header"),
    ],
)
def test_gguf_metadata_errors_name_the_file(label, value, message, tmp_path):
    path = tmp_path / "模型.gguf"
    path.write_bytes(_gguf_patched(gguf_seeds()[0], label, value))
    assert message in _fails_fast(lambda: read_gguf(path), path, seconds=1.0, max_bytes=100 * limits.MiB)


def test_gguf_config_errors_name_the_file(tmp_path):
    """A GGUF that lacks a size (here: its embedding length renamed away) is one error naming the file."""
    seed = gguf_seeds()[0]
    key = b"llama.embedding_length"
    path = tmp_path / "缺少.gguf"
    path.write_bytes(seed.replace(key, b"llama.embedding_lengtX", 1))
    message = _fails_fast(lambda: read_gguf(path), path, seconds=1.0, max_bytes=100 * limits.MiB)
    assert "GGUF metadata lacks llama.embedding_length" in message
