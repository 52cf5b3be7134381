"""A tiny but well-formed Llama checkpoint, written with the standard library only.

The files look like a real Hugging Face Llama repository (config, generation config, a real
``tokenizers`` ``tokenizer.json``, safetensors weights with the real tensor names and shapes), so the
download, conversion-planning and upload code paths see the same layout as with a real model, at a
few hundred KiB.
"""

from __future__ import annotations

import functools
import json
import random
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_VOCAB_WORDS",
    "SAFETENSORS_DTYPES",
    "PickleWriter",
    "TensorData",
    "read_safetensors_header",
    "torch_state_dict_pickle",
    "write_lora_adapter",
    "write_safetensors",
    "write_tiny_llama",
    "write_torch_checkpoint",
    "write_torch_zip",
]

#: safetensors dtype name -> bytes per element.
SAFETENSORS_DTYPES: dict[str, int] = {"F16": 2, "BF16": 2, "F32": 4}
_TORCH_TO_ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

#: Tensor payload: the raw little-endian bytes, or a zero-argument callable producing them (as bytes
#: or as an iterable of byte chunks) so large tensors are generated only while being written.
TensorData = bytes | bytearray | memoryview | Callable[[], bytes | Iterable[bytes]]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

_PUNCTUATION = ". , ! ? ; : ' \" ( ) - / %".split()
_COMMON = """
the of and to a in is it you that he was for on are with as his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing
see him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port large spell add even land
here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second book carry took
science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face
wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king space
model engine token layer weight hello
""".split()
_DIGITS = [str(i) for i in range(10)]

#: The default word list: punctuation, digits and a few hundred common English words.
DEFAULT_VOCAB_WORDS: tuple[str, ...] = tuple(dict.fromkeys([*_PUNCTUATION, *_DIGITS, *_COMMON]))


def _header_bytes(header: dict) -> bytes:
    """Encode a safetensors JSON header, space-padded so the data section starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _iter_chunks(data: TensorData) -> Iterator[bytes]:
    payload = data() if callable(data) else data
    if isinstance(payload, (bytes, bytearray, memoryview)):
        yield bytes(payload)
    else:
        yield from payload


def write_safetensors(
    path: Path,
    tensors: Iterable[tuple[str, str, list[int], TensorData]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, never holding more than one tensor in memory.

    ``tensors`` yields ``(name, dtype, shape, data)`` with dtype one of :data:`SAFETENSORS_DTYPES`.
    ``data`` may be a callable (see :data:`TensorData`), so only the names and shapes are needed up
    front: the offsets follow from dtype and shape, and each payload's length is checked on write.
    """
    path = Path(path)
    specs = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape, _ in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"unsupported safetensors dtype {dtype!r} for {name}")
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = SAFETENSORS_DTYPES[dtype]
        for dim in shape:
            nbytes *= int(dim)
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = _header_bytes(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, _, _, data in specs:
            start, end = header[name]["data_offsets"]  # type: ignore[index]
            written = 0
            for chunk in _iter_chunks(data):
                f.write(chunk)
                written += len(chunk)
            if written != end - start:
                raise ValueError(f"tensor {name}: got {written} bytes, shape needs {end - start}")
    return path


def read_safetensors_header(path: Path) -> dict:
    """Parse and return the JSON header of a safetensors file (``__metadata__`` included).

    Checks that the tensors' byte ranges are contiguous and cover the data section exactly.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, 100 * 1024 * 1024):
            raise ValueError(f"{path}: implausible safetensors header length {n}")
        header = json.loads(f.read(n))
    ranges = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    expected = 0
    for start, end in ranges:
        if start != expected or end < start:
            raise ValueError(f"{path}: tensor data offsets are not contiguous at byte {start}")
        expected = end
    if 8 + n + expected != size:
        raise ValueError(f"{path}: data section is {size - 8 - n} bytes, tensors cover {expected}")
    return header


def _tensor_bytes(seed: int, name: str, count: int, dtype: str, *, scale: float, offset: float) -> Iterator[bytes]:
    """Deterministic pseudo-random values ``offset + scale * U(-1, 1)``, in chunks, for one tensor."""
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"nimflow-tiny-llama:{seed}:{name}")
    chunk = 1 << 16
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        values = [offset + scale * (2.0 * rng.random() - 1.0) for _ in range(n)]
        if dtype == "F16":
            yield struct.pack(f"<{n}e", *values)
        else:
            f32 = struct.pack(f"<{n}f", *values)
            if dtype == "F32":
                yield f32
            else:  # BF16 = the high half of each little-endian float32 (truncation)
                out = bytearray(2 * n)
                out[0::2], out[1::2] = f32[2::4], f32[3::4]
                yield bytes(out)


def _tokenizer_json(vocab: dict[str, int]) -> dict:
    """A ``tokenizers`` WordLevel tokenizer with a Whitespace pre-tokenizer that prepends ``<s>``."""
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    bos = SPECIAL_TOKENS[BOS_ID]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIAL_TOKENS[UNK_ID]},
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


#: A minimal Llama-style chat template (what an instruct model's tokenizer_config.json carries).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_llama(
    directory: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_words: Sequence[str] | None = None,
    dtype: str = "float16",
    shards: int = 1,
    weight_format: str = "safetensors",
    chat_template: bool = True,
) -> Path:
    """Write a tiny Llama checkpoint into ``directory`` (created if needed) and return it.

    Weights are deterministic per ``seed`` (a different seed gives different bytes). With
    ``shards > 1`` the weights go to ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``; otherwise to ``model.safetensors``. ``weight_format="pickle"``
    writes the same tensors as torch.save would: ``pytorch_model.bin`` (or
    ``pytorch_model-0000i-of-0000N.bin`` plus ``pytorch_model.bin.index.json``). An instruct
    model's tokenizer has a chat template; ``chat_template=False`` writes a base model's, without one.
    """
    if dtype not in _TORCH_TO_ST:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_TO_ST)}, not {dtype!r}")
    if weight_format not in ("safetensors", "pickle"):
        raise ValueError(f"weight_format must be 'safetensors' or 'pickle', not {weight_format!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if min(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, shards) < 1:
        raise ValueError("sizes and shards must be positive")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st_dtype = _TORCH_TO_ST[dtype]

    words = [w for w in dict.fromkeys(vocab_words if vocab_words is not None else DEFAULT_VOCAB_WORDS)
             if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    vocab_size = len(vocab)
    head_dim = hidden_size // num_heads
    kv_dim = num_kv_heads * head_dim

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": dtype,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "transformers_version": "4.46.0",
    }
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "do_sample": False, "max_new_tokens": 64, "transformers_version": "4.46.0",
    })
    _write_json(directory / "tokenizer.json", _tokenizer_json(vocab))
    unk, bos, eos = SPECIAL_TOKENS
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        **({"chat_template": TINY_CHAT_TEMPLATE} if chat_template else {}),
        "added_tokens_decoder": {
            str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    })
    _write_json(directory / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos, "unk_token": unk})

    # (name, shape, scale, offset): norms start near 1.0 like a trained RMSNorm, matrices near 0.
    shapes: list[tuple[str, list[int], float, float]] = [("model.embed_tokens.weight", [vocab_size, hidden_size], 0.05, 0.0)]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", [hidden_size, hidden_size], 0.05, 0.0),
            (p + "self_attn.k_proj.weight", [kv_dim, hidden_size], 0.05, 0.0),
            (p + "self_attn.v_proj.weight", [kv_dim, hidden_size], 0.05, 0.0),
            (p + "self_attn.o_proj.weight", [hidden_size, hidden_size], 0.05, 0.0),
            (p + "mlp.gate_proj.weight", [intermediate_size, hidden_size], 0.05, 0.0),
            (p + "mlp.up_proj.weight", [intermediate_size, hidden_size], 0.05, 0.0),
            (p + "mlp.down_proj.weight", [hidden_size, intermediate_size], 0.05, 0.0),
            (p + "input_layernorm.weight", [hidden_size], 0.01, 1.0),
            (p + "post_attention_layernorm.weight", [hidden_size], 0.01, 1.0),
        ]
    shapes += [("model.norm.weight", [hidden_size], 0.01, 1.0), ("lm_head.weight", [vocab_size, hidden_size], 0.05, 0.0)]

    def entry(name: str, shape: list[int], scale: float, offset: float) -> tuple[str, str, list[int], TensorData]:
        count = _prod(shape)
        return name, st_dtype, shape, lambda: _tensor_bytes(seed, name, count, st_dtype, scale=scale, offset=offset)

    tensors = [entry(*s) for s in shapes]
    for old in [*directory.glob("model-*-of-*.safetensors"), directory / "model.safetensors",
                directory / "model.safetensors.index.json", *directory.glob("pytorch_model*.bin"),
                directory / "pytorch_model.bin.index.json"]:
        old.unlink(missing_ok=True)  # a rewrite with another shard count must not leave stale weights
    if shards == 1:
        if weight_format == "pickle":
            write_torch_checkpoint(directory / "pytorch_model.bin", tensors)
        else:
            write_safetensors(directory / "model.safetensors", tensors)
        return directory

    # Contiguous groups of roughly equal byte size, like transformers' max_shard_size splitting.
    nbytes = [SAFETENSORS_DTYPES[st_dtype] * _prod(shape) for _, shape, _, _ in shapes]
    total = sum(nbytes)
    groups: list[list[int]] = [[] for _ in range(shards)]
    acc = 0
    for idx, size in enumerate(nbytes):
        g = min(shards - 1, acc * shards // total)
        groups[g].append(idx)
        acc += size
    groups = [g for g in groups if g] or [[]]
    n = len(groups)
    weight_map: dict[str, str] = {}
    stem, suffix = ("pytorch_model", "bin") if weight_format == "pickle" else ("model", "safetensors")
    for k, group in enumerate(groups, start=1):
        fname = f"{stem}-{k:05d}-of-{n:05d}.{suffix}"
        if weight_format == "pickle":
            write_torch_checkpoint(directory / fname, [tensors[i] for i in group])
        else:
            write_safetensors(directory / fname, [tensors[i] for i in group])
        weight_map.update({tensors[i][0]: fname for i in group})
    index = "pytorch_model.bin.index.json" if weight_format == "pickle" else "model.safetensors.index.json"
    _write_json(directory / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return directory


# --- PyTorch pickle checkpoints (torch.save's zip format), written without torch ------------------

#: safetensors dtype -> the storage class torch.save names in a storage's persistent id.
_ST_TO_STORAGE = {"F16": "HalfStorage", "BF16": "BFloat16Storage", "F32": "FloatStorage"}


class PickleWriter:
    """Emits pickle protocol 2 opcodes one by one, as torch.save's pickler does for a state dict.

    Only what a state dict needs (and what tests need to build hostile pickles) is here; see
    ``pickle.py``/``pickletools`` for the opcodes.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module: str, name: str) -> PickleWriter:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL
        return self

    def unicode(self, text: str) -> PickleWriter:
        raw = text.encode()
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE
        return self

    def int_(self, value: int) -> PickleWriter:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])  # BININT1
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1
        return self

    def bool_(self, value: bool) -> PickleWriter:
        self.out += b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
        return self

    def op(self, code: bytes) -> PickleWriter:
        """A raw opcode: ``(`` MARK, ``t`` TUPLE, ``)`` EMPTY_TUPLE, ``}`` EMPTY_DICT, ``R`` REDUCE,
        ``u`` SETITEMS, ``s`` SETITEM, ``b`` BUILD, ``Q`` BINPERSID, ``.`` STOP."""
        self.out += code
        return self

    def int_tuple(self, values: Sequence[int]) -> PickleWriter:
        self.op(b"(")
        for v in values:
            self.int_(v)
        return self.op(b"t")

    def empty_ordered_dict(self) -> PickleWriter:
        return self.global_("collections", "OrderedDict").op(b")R")

    def bytes_(self) -> bytes:
        return bytes(self.out + b".")


def torch_state_dict_pickle(
    entries: Sequence[tuple[str, str, str, int, list[int], list[int]]],
    *,
    ordered: bool = True,
    parameters: bool = False,
) -> bytes:
    """``data.pkl`` of a state dict, as torch.save writes it.

    ``entries`` are ``(name, safetensors dtype, storage key, storage numel, shape, stride)``; each
    tensor is ``torch._utils._rebuild_tensor_v2(<persistent storage id>, 0, shape, stride, False,
    OrderedDict())``, the storage id being ``('storage', torch.<Type>Storage, key, 'cpu', numel)``.
    ``ordered`` wraps them in an OrderedDict with ``_metadata`` (``model.state_dict()``), else a
    plain dict (what transformers' sharding writes); ``parameters`` wraps each in
    ``torch._utils._rebuild_parameter``.
    """
    w = PickleWriter()
    if ordered:
        w.empty_ordered_dict()
    else:
        w.op(b"}")
    w.op(b"(")
    for name, dtype, key, numel, shape, stride in entries:
        w.unicode(name)
        if parameters:
            w.global_("torch._utils", "_rebuild_parameter")
            w.op(b"(")
        w.global_("torch._utils", "_rebuild_tensor_v2")
        w.op(b"(")
        w.op(b"(").unicode("storage").global_("torch", _ST_TO_STORAGE[dtype]).unicode(key).unicode("cpu").int_(numel)
        w.op(b"tQ")
        w.int_(0).int_tuple(shape).int_tuple(stride).bool_(False).empty_ordered_dict()
        w.op(b"tR")
        if parameters:
            w.bool_(True).empty_ordered_dict().op(b"tR")
    w.op(b"u")
    if ordered:  # state_dict()'s _metadata attribute, set through BUILD
        w.op(b"}").unicode("_metadata").empty_ordered_dict().op(b"(").unicode("").op(b"}")
        w.unicode("version").int_(1).op(b"s").op(b"us").op(b"b")
    return w.bytes_()


def write_torch_zip(path: Path, data_pkl: bytes, storages: Iterable[tuple[str, TensorData]], *,
                    archive: str = "archive", byteorder: str = "little", compression: int = zipfile.ZIP_STORED) -> Path:
    """Write a torch.save zip archive: ``<archive>/data.pkl``, ``byteorder``, ``data/<key>``, ``version``.

    Members are stored uncompressed, like torch writes them, unless ``compression`` says otherwise
    (hostile archives: a deflated data.pkl, a bzip2 storage); storage payloads are streamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr(f"{archive}/data.pkl", data_pkl)
        zf.writestr(f"{archive}/byteorder", byteorder)
        for key, data in storages:
            with zf.open(f"{archive}/data/{key}", "w", force_zip64=True) as member:
                for chunk in _iter_chunks(data):
                    member.write(chunk)
        zf.writestr(f"{archive}/version", "3\n")
    return path


def write_torch_checkpoint(
    path: Path,
    tensors: Iterable[tuple[str, str, list[int], TensorData]],
    *,
    archive: str = "archive",
    ordered: bool = True,
    parameters: bool = False,
    strides: dict[str, list[int]] | None = None,
) -> Path:
    """Write ``tensors`` (as for :func:`write_safetensors`) the way ``torch.save(state_dict, path)`` does.

    ``strides`` overrides a tensor's stride (e.g. a transposed view) to build non-contiguous tensors;
    the storage then holds the same bytes, read with that stride.
    """
    specs = list(tensors)
    entries, storages = [], []
    for key, (name, dtype, shape, data) in enumerate(specs):
        if dtype not in _ST_TO_STORAGE:
            raise ValueError(f"unsupported dtype {dtype!r} for {name}")
        contiguous = [_prod(shape[i + 1:]) for i in range(len(shape))]
        entries.append((name, dtype, str(key), _prod(shape), list(shape), (strides or {}).get(name, contiguous)))
        storages.append((str(key), data))
    return write_torch_zip(path, torch_state_dict_pickle(entries, ordered=ordered, parameters=parameters), storages,
                           archive=archive)


# --- LoRA adapters -------------------------------------------------------------------------------


def write_lora_adapter(
    directory: Path,
    base_dir: Path,
    *,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    alpha: int = 16,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
    weight_format: str = "safetensors",
    extra_config: dict | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint in ``base_dir`` into ``directory`` and return it.

    For every 2-D base weight ``<module>.weight`` whose last name is in ``target_modules``, the
    adapter holds ``base_model.model.<module>.lora_A.weight`` [rank, in] and ``lora_B.weight``
    [out, rank] in the base's dtype, and ``adapter_config.json`` says ``r``, ``lora_alpha`` and
    ``target_modules`` as PEFT saves them. ``weight_format="pickle"`` writes adapter_model.bin.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = {}
    for shard in sorted(Path(base_dir).glob("*.safetensors")):
        base.update({k: v for k, v in read_safetensors_header(shard).items() if k != "__metadata__"})
    tensors: list[tuple[str, str, list[int], TensorData]] = []
    for name in sorted(base):
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in target_modules or len(base[name]["shape"]) != 2:
            continue
        out_features, in_features = base[name]["shape"]
        dtype = base[name]["dtype"]
        for part, shape in (("lora_A", [rank, in_features]), ("lora_B", [out_features, rank])):
            tensor = f"base_model.model.{module}.{part}.weight"
            count = _prod(shape)
            tensors.append((tensor, dtype, shape,
                            functools.partial(_tensor_bytes, seed, tensor, count, dtype, scale=0.02, offset=0.0)))
    if not tensors:
        raise ValueError(f"no 2-D weights in {base_dir} match target_modules {list(target_modules)}")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path if base_model_name_or_path is not None else str(base_dir),
        "modules_to_save": None, "revision": None, **(extra_config or {}),
    }
    _write_json(directory / "adapter_config.json", config)
    if weight_format == "pickle":
        write_torch_checkpoint(directory / "adapter_model.bin", tensors, ordered=False)
    else:
        write_safetensors(directory / "adapter_model.safetensors", tensors)
    return directory


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
