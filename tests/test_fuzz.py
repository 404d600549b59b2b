"""Fuzzed readers: every reader of a file from elsewhere, given damaged files, either succeeds or
raises our one-line UserError: never another exception, a hang or a blown memory.

``fuzz_a_reader`` is the generic part: a reader (directory -> anything), a function that writes a valid
fixture into a directory, and the names of the files in it that may be damaged. Hypothesis (derandomized:
the same cases on every run, no shrinking, no example database) picks a file and a damage:

    truncate, flip (1-8 bits), splice (random bytes over a span), empty          every file
    json: a value replaced (wrong type, NaN, 2**70, deep lists), a key dropped   .json files
    tensors: a dtype changed (int64, bool, ...), NaN/inf, a shape changed,
             a tensor dropped, renamed or added                                 .safetensors files
    metadata: a value replaced ("abc", "nan", "1e30", "-5", "", ...)            .safetensors files
    header: a tensor's declared shape or the header length made huge            .safetensors files
    npy: the images array's header claims another shape/dtype (up to 2**40)     .npz files
    bomb: a PNG header declaring up to 2**31 x 2**31 pixels                      image files

Each call runs under a 30 s alarm (a hang fails) and an address-space limit of what the process maps plus
1 GiB (a larger allocation is a MemoryError, which fails); the peak RSS may also grow by at most 1 GiB.
Readers added by other issues (tokenizer files, VAE/text-encoder checkpoints, other LoRA formats) need one
line each in ``READERS`` at the bottom.
"""

from __future__ import annotations

import copy
import io
import json
import resource
import shutil
import signal
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lora4diffusion.checkpoint import save_tensors, write_json
from lora4diffusion.classifier import CONFIG_NAME as CLF_CONFIG
from lora4diffusion.classifier import FORMAT as CLF_FORMAT
from lora4diffusion.classifier import VERSION as CLF_VERSION
from lora4diffusion.classifier import WEIGHTS_NAME as CLF_WEIGHTS
from lora4diffusion.classifier import Classifier, ClassifierConfig, load_classifier
from lora4diffusion.cli import main
from lora4diffusion.cli import sample as sample_cli
from lora4diffusion.cli.main import build_parser
from lora4diffusion.data import load_mnist
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import load_samples
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.lora.adapters import export_peft, import_peft, load_adapter, save_adapter
from lora4diffusion.lora.layers import inject_lora
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.prompt_syntax import prompt_loras
from lora4diffusion.styles import load_style_data
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, TrainConfig

EXAMPLES = 60  # per reader: the whole file stays well under a minute on 2 cores
CALL_SECONDS = 30
MEMORY_GROWTH = 1 << 30
CFG = UNetConfig(
    image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), context_dim=32
)
TALLY: dict[str, dict[str, int]] = {}  # reader -> {"ok": n, "UserError": n}: the counts in RELIABILITY.md


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# ------------------------------------------------------------------ damages
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "32", "nan", "no", "pissa", "1e12", "LORA", "linear"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
META_TEXT = st.sampled_from([
    "", "abc", "nan", "inf", "-inf", "1e30", "-5", "0", "4.7", "9" * 40, "[", "{}", "null", "true", "[1,",
    '{"unet": 1}', "standard", "rslora",
]) | st.text(max_size=16)
DTYPES = [torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8, torch.float16, torch.bfloat16,
          torch.float64]
NPY_DTYPES = ["<f4", "|O", "<c8", ">f8", "|b1", "<U4", "|V8", "<i8", "|u1", "<f2", "<M8[s]"]
IMAGE_SUFFIXES = (".png", ".jpg", ".gif", ".bmp", ".tif")


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, (*prefix, i))


def _json_damage(draw, data: bytes) -> bytes:
    obj = json.loads(data)
    paths = [p for p in _json_paths(obj) if p]
    path = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(obj).encode()  # NaN/Infinity written as json.dumps does: not JSON, a reader must say so


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _tensor_damage(draw, data: bytes) -> bytes:
    header, _ = _split_safetensors(data)
    meta = header.get("__metadata__")
    tensors = dict(st_load(data))
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key].clone()
    how = draw(st.sampled_from(["dtype", "nan", "inf", "shape", "drop", "rename", "extra", "huge"]))
    if how == "dtype":
        tensors[key] = t.to(draw(st.sampled_from(DTYPES)))
    elif how in ("nan", "inf", "huge") and t.numel():
        flat = t.flatten()
        value = {"nan": float("nan"), "inf": -float("inf"), "huge": 3e38}[how]
        flat[draw(st.integers(0, t.numel() - 1))] = value
        tensors[key] = flat.reshape(t.shape)
    elif how == "shape":
        tensors[key] = draw(st.sampled_from([t.flatten(), t[None], t.flatten()[: max(1, t.numel() // 2)]]))
    elif how == "drop" and len(tensors) > 1:
        del tensors[key]
    elif how == "rename":
        tensors[key + draw(st.sampled_from(["x", ".weight", "_"]))] = tensors.pop(key)
    else:
        tensors[draw(st.text("abc._", min_size=1, max_size=8))] = torch.zeros(draw(st.integers(0, 4)))
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def _metadata_damage(draw, data: bytes) -> bytes:
    header, body = _split_safetensors(data)
    meta = header.setdefault("__metadata__", {})
    key = draw(st.sampled_from(sorted(meta) + ["extra"]))
    meta[key] = draw(META_TEXT)
    return _join_safetensors(header, body)


def _header_damage(draw, data: bytes) -> bytes:
    if draw(st.booleans()):  # the header length itself
        return struct.pack("<Q", draw(st.integers(2**20, 2**64 - 1))) + data[8:]
    header, body = _split_safetensors(data)
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    header[key]["shape"] = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=4))
    return _join_safetensors(header, body)


def _npy(shape, dtype: str, payload: bytes) -> bytes:
    head = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    head += b" " * (63 - (len(head) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + payload


def _npz_damage(draw, data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    shape = draw(st.lists(st.integers(0, 2**40), max_size=4))
    payload = members["images.npy"][128:]
    members["images.npy"] = _npy(shape, draw(st.sampled_from(NPY_DTYPES)), payload)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return out.getvalue()


RECORD_TEXT = st.sampled_from([
    "", "{", "[" * 100_000 + "]" * 100_000, '{"seed": ' + "9" * 5000 + "}", "[]", "null", '"text"', "NaN",
    '{"steps": Infinity}', "x" * (1 << 20 | 1), '{"per_digit": 1e999}',
]) | st.text(max_size=40)


def _record_of(target: str, data: bytes) -> str | None:
    """The sampling record (JSON text) of a samples.png / samples.npz as `sample` writes it, else None."""
    try:
        if target.endswith(".png"):
            with Image.open(io.BytesIO(data)) as im:
                return im.info.get("lora4diffusion")
        if target.endswith(".npz"):
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                return str(f["parameters"]) if "parameters" in f.files else None
    except Exception:
        return None
    return None


def _with_record(target: str, data: bytes, text: str) -> bytes:
    """The same file with its record replaced by ``text``."""
    out = io.BytesIO()
    if target.endswith(".png"):
        with Image.open(io.BytesIO(data)) as im:
            info = PngInfo()
            for key, value in im.info.items():
                if isinstance(value, str):
                    info.add_text(key, text if key == "lora4diffusion" else value)
            im.save(out, format="PNG", pnginfo=info)
        return out.getvalue()
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(out, **{**arrays, "parameters": np.array(text, dtype=np.str_)})
    return out.getvalue()


def _record_npy_damage(draw, data: bytes) -> bytes:
    """``parameters.npy``'s header claims another shape or dtype (a text of 10^8 characters, objects, ...)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    shape = draw(st.sampled_from([(), (2,), (2**40,)]))
    dtype = draw(st.sampled_from(["<U100000000", "<U10", "|O", "<f8", "|S300", ">U300"]))
    members["parameters.npy"] = _npy(shape, dtype, members["parameters.npy"][128:])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@st.composite
def damage(draw, files: dict[str, bytes], targets: tuple[str, ...]) -> tuple[str, str, bytes]:
    target = draw(st.sampled_from(targets))
    data = files[target]
    kinds = ["truncate", "flip", "splice", "empty"]
    if target.endswith(".json"):
        kinds += ["json", "json", "json"]
    if target.endswith(".safetensors"):
        kinds += ["tensors", "tensors", "metadata", "header"]
    if target.endswith(".npz"):
        kinds += ["npy", "npy"]
    if target.endswith(IMAGE_SUFFIXES):
        kinds += ["bomb"]
    if _record_of(target, data) is not None:  # a sampling record inside a samples.png / samples.npz
        kinds += ["record", "record", "record", "record text"] + (["record npy"] if target.endswith(".npz")
                                                                   else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        new = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        new = bytes(buf)
    elif kind == "splice":
        start = draw(st.integers(0, len(data) - 1))
        new = data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start + 64 :]
    elif kind == "empty":
        new = b""
    elif kind == "json":
        new = _json_damage(draw, data)
    elif kind == "tensors":
        new = _tensor_damage(draw, data)
    elif kind == "metadata":
        new = _metadata_damage(draw, data)
    elif kind == "header":
        new = _header_damage(draw, data)
    elif kind == "npy":
        new = _npz_damage(draw, data)
    elif kind == "record":
        new = _with_record(target, data, _json_damage(draw, _record_of(target, data).encode()).decode())
    elif kind == "record text":
        new = _with_record(target, data, draw(RECORD_TEXT))
    elif kind == "record npy":
        new = _record_npy_damage(draw, data)
    else:
        new = png_bomb(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    return target, kind, new


def _cap_address_space(extra: int) -> tuple[int, int] | None:
    """Limit this process's address space to what it maps now + ``extra`` (Linux); returns the old limits.
    The peak-RSS check below cannot see a reader allocating less than an earlier test's peak; this can."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    vm_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:")), None)
    if vm_kb is None:
        return None
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kb * 1024 + extra
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    return old


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("a reader ran past its time limit")


def fuzz_a_reader(name: str, build: Callable[[Path], None], read: Callable[[Path], object],
                  targets: tuple[str, ...], tmp_path: Path, examples: int = EXAMPLES,
                  seconds: float = CALL_SECONDS, damages=None) -> dict[str, int]:
    """Damage one of ``targets`` in a valid fixture (written once by ``build``), call ``read(directory)``:
    success or a one-line UserError, within CALL_SECONDS, without growing peak memory by MEMORY_GROWTH.
    ``damages``: the strategy drawing (target, kind, new bytes) from (files, targets); default ``damage``."""
    fixture = tmp_path / "valid"
    fixture.mkdir()
    build(fixture)
    files = {p.relative_to(fixture).as_posix(): p.read_bytes() for p in fixture.rglob("*") if p.is_file()}
    assert set(targets) <= set(files), (targets, sorted(files))
    read(fixture)  # the undamaged fixture reads
    tally = TALLY.setdefault(name, {"ok": 0, "UserError": 0})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    counter = iter(range(10**6))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given((damages or damage)(files, targets))
    def one_case(case):
        target, kind, new = case
        case_dir = tmp_path / f"case{next(counter)}"
        for rel, data in files.items():
            (case_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / rel).write_bytes(new if rel == target else data)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        limits = _cap_address_space(MEMORY_GROWTH)  # an allocation beyond it is a MemoryError: a failure
        try:
            read(case_dir)
            tally["ok"] += 1
        except UserError as e:
            msg = str(e)
            assert msg and "\n" not in msg and len(msg) < 600, f"{name}/{target}/{kind}: {msg!r}"
            tally["UserError"] += 1
        finally:
            if limits is not None:
                resource.setrlimit(resource.RLIMIT_AS, limits)
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    one_case()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < MEMORY_GROWTH, f"{name}: peak memory grew by {grown >> 20} MiB"
    assert tally["ok"] + tally["UserError"] >= examples
    print(f"fuzz {name}: {tally['ok'] + tally['UserError']} cases, {tally['UserError']} UserError,"
          f" {tally['ok']} read fine")
    return tally


# ------------------------------------------------------------------ fixtures of each kind
def _idx(arr: np.ndarray) -> bytes:
    magic = 0x801 if arr.ndim == 1 else 0x803
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def build_idx(d: Path) -> None:
    import gzip

    rng = np.random.default_rng(0)
    labels = (np.arange(20) % 10).astype(np.uint8)
    (d / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)), mtime=0))
    (d / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels))


def _save_images(d: Path) -> None:
    rng = np.random.default_rng(1)
    ink = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    for digit, suffix, mode in [("0", ".png", "L"), ("1", ".jpg", "RGB"), ("2", ".gif", "P"),
                                ("3", ".bmp", "L"), ("4", ".tif", "F"), ("5", ".png", "RGBA")]:
        (d / digit).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(ink).convert(mode) if mode != "F" else Image.fromarray(ink.astype(np.float32))
        im.save(d / digit / f"a{suffix}")


def build_image_folder(d: Path) -> None:
    _save_images(d)


def build_csv(d: Path) -> None:
    _save_images(d / "img")
    rows = ["path,label"] + [f"img/{p}/a{s},{p}" for p, s in
                             [("0", ".png"), ("1", ".jpg"), ("2", ".gif"), ("3", ".bmp"), ("4", ".tif")]]
    (d / "style.csv").write_text("\n".join(rows) + "\n")


def make_base(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(CFG)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


BASE = make_base()


def build_model(d: Path) -> None:
    save_model(d, BASE, DiffusionConfig())


def build_adapter(d: Path) -> None:
    model = copy.deepcopy(BASE)
    inject_lora(model, "attention", 2, 2.0)
    save_adapter(model, d, metadata={"style": "fuzz"})


def read_adapter_into_base(d: Path) -> None:
    load_adapter(copy.deepcopy(BASE), d)


def build_peft(d: Path) -> None:
    model = copy.deepcopy(BASE)
    inject_lora(model, "attention", 2, 2.0)
    export_peft(model, d)


def _trainer(run: Path, steps: int) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup=1, checkpoint_every=1, sample_every=0, bf16=False)
    images, labels = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10
    return Trainer(UNet(CFG), NoiseSchedule(DiffusionConfig()), images, labels, cfg, run,
                   export=lambda m, p: None, device="cpu")


def build_train_state(d: Path) -> None:
    _trainer(d, 1).fit(progress=False)
    for p in d.iterdir():
        if p.name != STATE_NAME:
            p.unlink()


def resume_train_state(d: Path) -> None:
    _trainer(d, 2).resume()


def build_npz(d: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(d / "samples.npz", images=rng.random((4, 28, 28), dtype=np.float32),
             labels=np.arange(4, dtype=np.int64))


def build_classifier(d: Path) -> None:
    model = Classifier(ClassifierConfig(channels=(4, 4, 4), feature_dim=8))
    save_tensors(d / CLF_WEIGHTS, {k: v.float() for k, v in model.state_dict().items()})
    write_json(d / CLF_CONFIG, {"format": CLF_FORMAT, "version": CLF_VERSION, "accuracy": 0.5,
                                "classifier": {"channels": [4, 4, 4], "feature_dim": 8, "dropout": 0.0}})


IMAGES = tuple(f"{p}/a{s}" for p, s in [("0", ".png"), ("1", ".jpg"), ("2", ".gif"), ("3", ".bmp"),
                                        ("4", ".tif"), ("5", ".png")])

def build_vae(d: Path) -> None:
    from lora4diffusion.folders.vae import save_vae
    from lora4diffusion.models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    save_vae(d, VAE(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, image_size=16)))


def read_vae(d: Path) -> None:
    from lora4diffusion.folders.vae import load_vae

    load_vae(d)


def build_tokenizer(d: Path) -> None:
    from lora4diffusion.models.tokenizer import Tokenizer

    Tokenizer.load().save(d)


def read_tokenizer(d: Path) -> None:
    from lora4diffusion.models.tokenizer import Tokenizer

    Tokenizer.load(d).encode(["a handwritten seven", "the digit 7"])


def _lora_file(d: Path, fmt: str) -> None:
    from lora4diffusion.formats import write_lora
    from lora4diffusion.lora.adapters import adapter_from_model

    model = copy.deepcopy(BASE)
    inject_lora(model, "attention", 2, 2.0)
    write_lora(adapter_from_model(model), fmt, d, title="fuzz")


def _method_file(d: Path, kind: str, fmt: str, options: dict | None = None) -> None:
    """A DoRA / LoHa / LoKr adapter written as ``fmt``; a kohya (LyCORIS-layout) file without our settings
    entry, as LyCORIS writes it, so its method, rank, axis and LoKr options are read from the tensors."""
    from safetensors import safe_open

    from lora4diffusion.formats import write_lora
    from lora4diffusion.lora.adapters import adapter_from_model
    from lora4diffusion.lora.layers import METHODS

    model = copy.deepcopy(BASE)
    inject_lora(model, "attention+conv", 2, 2.0, method=METHODS[kind], options=options)
    path = write_lora(adapter_from_model(model), fmt, d, title="fuzz")
    if fmt == "kohya":
        with safe_open(str(path), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if not k.startswith("lora4diffusion")}
        path.write_bytes(st_save(st_load(path.read_bytes()), metadata=meta))


def read_lora_file(d: Path) -> None:
    from lora4diffusion.formats import read_any

    files = sorted(d.glob("*.safetensors"))
    load_adapter(copy.deepcopy(BASE), read_any(files[0] if files else d))


def build_prompt_model(d: Path) -> None:
    """A tiny prompt-conditioned latent model: UNet (text mode), text encoder, tokenizer/ and vae/."""
    from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
    from lora4diffusion.models.tokenizer import Tokenizer
    from lora4diffusion.models.unet import UNet, UNetConfig
    from lora4diffusion.models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4))
    tok = Tokenizer.load()
    te = TextEncoder(TextEncoderConfig.for_tokenizer(tok, width=32, layers=1, heads=2))
    unet = UNet(UNetConfig(image_size=vae.cfg.latent_size, in_channels=vae.cfg.latent_channels,
                           base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
                           context_dim=32, conditioning="text"))
    save_model(d, unet, DiffusionConfig(), vae=vae, text=(te, tok))


def read_prompt_model(d: Path) -> None:
    from lora4diffusion.pipeline import Pipeline

    Pipeline.load(d)


def build_sd_pipeline(d: Path) -> None:
    """The tiny prompt model above, exported as a diffusers StableDiffusionPipeline folder."""
    from lora4diffusion.formats.diffusers import export_diffusers
    from lora4diffusion.pipeline import Pipeline

    build_prompt_model(d / "src")
    pipe = Pipeline.load(d / "src")
    export_diffusers(pipe.unet, pipe.diffusion, d / "sd", vae=pipe.vae, text=pipe.text)
    shutil.rmtree(d / "src")


def read_sd_pipeline(d: Path) -> None:
    from lora4diffusion.formats.stable_diffusion import read_sd_pipeline as read

    read(d / "sd")


RECORDS = ("digits/samples.png", "digits/samples.npz", "prompts/samples.png", "prompts/samples.npz")


def build_sampling_records(d: Path) -> None:
    """What `sample` writes, for digits (with an adapter) and for prompts (with a <lora:...> tag)."""
    common = ["-q", "sample", "--steps", "1", "--lora", "bold:0.5"]
    assert main([*common, "--digits", "3,7", "--per-digit", "1", "--out", str(d / "digits")]) == 0
    assert main(["-q", "sample", "--steps", "1", "--prompt", "<lora:italic:0.5> a sks ohwx seven", "--num",
                 "1", "--out", str(d / "prompts")]) == 0  # fmt: skip


def _checked_only(args, digits, out) -> int:
    """cmd_sample up to the model: what a record put on the command line, tags included, is checked; the
    sampling itself (seconds per case, or hours for a valid record asking 10,000 x 10^9 steps) is not run."""
    if args.prompt:
        prompt_loras(list(args.prompt))
    return 0


def read_sampling_records(d: Path) -> None:
    """`sample --from FILE` for each record, to the point where the model would load."""
    for i, rel in enumerate(RECORDS):
        args = build_parser().parse_args(["sample", "--from", str(d / rel), "--out", str(d / f"out{i}")])
        original = sample_cli.sample_into
        sample_cli.sample_into = _checked_only
        try:
            assert sample_cli.cmd_sample(args) == 0
        finally:
            sample_cli.sample_into = original


# ------------------------------------------------------------------ one line per reader
READERS = {
    "IDX folder": (build_idx, lambda d: load_mnist(str(d), heldout_per_class=1),
                   ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                    "t10k-labels-idx1-ubyte")),
    "image folder": (build_image_folder, lambda d: load_style_data(str(d)), IMAGES),
    "CSV style table": (build_csv, lambda d: load_style_data(str(d / "style.csv")),
                        ("style.csv", "style.csv", "img/0/a.png", "img/1/a.jpg", "img/4/a.tif")),
    "model checkpoint": (build_model, load_model, ("config.json", "model.safetensors")),
    "adapter": (build_adapter, read_adapter_into_base, ("adapter.safetensors",)),
    "train state": (build_train_state, resume_train_state, (STATE_NAME,)),
    "PEFT folder": (build_peft, lambda d: import_peft(d, base_model=BASE),
                    ("adapter_config.json", "adapter_model.safetensors")),
    "npz samples": (build_npz, lambda d: load_samples(d / "samples.npz"), ("samples.npz",)),
    "classifier": (build_classifier, load_classifier, (CLF_CONFIG, CLF_WEIGHTS)),
    "VAE folder": (build_vae, read_vae, ("config.json", "model.safetensors")),
    "prompt model folder": (build_prompt_model, read_prompt_model,
                            ("config.json", "model.safetensors", "text_encoder.safetensors",
                             "tokenizer/vocab.txt", "vae/config.json")),
    "tokenizer folder": (build_tokenizer, read_tokenizer, ("vocab.txt", "config.json")),
    "diffusers SD pipeline folder": (build_sd_pipeline, read_sd_pipeline,
                                     ("sd/model_index.json", "sd/unet/config.json",
                                      "sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/config.json",
                                      "sd/text_encoder/config.json", "sd/tokenizer/vocab.json",
                                      "sd/scheduler/scheduler_config.json")),
    "kohya LoRA file": (lambda d: _lora_file(d, "kohya"), read_lora_file, ("fuzz.safetensors",)),
    "diffusers LoRA file": (lambda d: _lora_file(d, "diffusers"), read_lora_file,
                            ("pytorch_lora_weights.safetensors",)),
    "LyCORIS LoKr file (kohya layout, no settings entry)": (
        lambda d: _method_file(d, "lokr", "kohya", {"decompose_both": True}), read_lora_file,
        ("fuzz.safetensors",)),
    "LyCORIS DoRA file (kohya layout, no settings entry)": (lambda d: _method_file(d, "dora", "kohya"),
                                                            read_lora_file, ("fuzz.safetensors",)),
    "PEFT LoKr folder": (lambda d: _method_file(d, "lokr", "peft"), lambda d: import_peft(d, base_model=BASE),
                         ("adapter_config.json", "adapter_model.safetensors")),
    "sampling record (`sample --from` a PNG / npz)": (build_sampling_records, read_sampling_records, RECORDS),
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_fuzz_reader(name, tmp_path):
    build, read, targets = READERS[name]
    fuzz_a_reader(name, build, read, targets, tmp_path)


# ------------------------------------------------------------------ files from elsewhere
# What other tools write and we read: foreign LoRA metadata (diffusers' lora_adapter_metadata, our
# lora4diffusion entry inside diffusers/kohya files, kohya's per-module alphas, PEFT's adapter_config.json)
# given wrong types, lists, huge numbers and deep nesting; and `list` / `info` over a folder mixing good and
# damaged models and adapters.
DEEP_JSON = st.sampled_from([50, 999, 5_000, 100_000]).flatmap(
    lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))
RAW_NUMBERS = st.sampled_from(["1e400", "-1e400", "9" * 5000, "1e-400", "-0", "2e308", str(2**70), "1E+3"])


def _json_text_damage(draw, text: str) -> str:
    """A JSON text (a metadata entry or a .json file) with one value replaced by another type, a list, a
    huge or overflowing number, or deep nesting; or the whole text replaced."""
    how = draw(st.sampled_from(["value", "value", "number", "deep", "whole"]))
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if how == "whole" or not isinstance(obj, (dict, list)) or not obj:
        return draw(DEEP_JSON | st.builds(json.dumps, JSON_VALUES))
    paths = [p for p in _json_paths(obj) if p]
    path = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if how == "value":
        parent[path[-1]] = draw(JSON_VALUES | st.lists(st.integers(-(2**70), 2**70), max_size=3))
        return json.dumps(obj)
    parent[path[-1]] = "\0MARK\0"  # a raw number or nesting json.dumps cannot write, spliced in as text
    raw = draw(RAW_NUMBERS if how == "number" else DEEP_JSON)
    return json.dumps(obj).replace('"\\u0000MARK\\u0000"', raw)


@st.composite
def foreign_damage(draw, files: dict[str, bytes], targets: tuple[str, ...]) -> tuple[str, str, bytes]:
    """One damage to what another tool writes: a JSON-valued metadata entry of a .safetensors file, a kohya
    alpha tensor (another shape, dtype or value), or a .json file's text."""
    target = draw(st.sampled_from(targets))
    data = files[target]
    if target.endswith(".json"):
        return target, "json text", _json_text_damage(draw, data.decode()).encode()
    header, body = _split_safetensors(data)
    meta = header.get("__metadata__") or {}
    alphas = sorted(k for k in header if k.endswith(".alpha"))
    kinds = (["metadata json"] if any(v[:1] in "[{" for v in meta.values()) else []) + (["alpha"] if alphas
                                                                                      else [])
    kind = draw(st.sampled_from(kinds or ["metadata"]))
    if kind == "alpha":
        tensors = dict(st_load(data))
        value = draw(st.sampled_from([[1.0, 2.0], [[1.0]], [], 0.0, -4.0, 1e30, 2**62, True, 3]))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.float64]))
        for key in draw(st.lists(st.sampled_from(alphas), min_size=1, max_size=3, unique=True)):
            tensors[key] = torch.tensor(value).to(dtype)
        return target, kind, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    if kind == "metadata json":
        key = draw(st.sampled_from(sorted(k for k, v in meta.items() if v[:1] in "[{")))
        meta[key] = _json_text_damage(draw, meta[key])
    else:
        meta[draw(st.sampled_from(sorted(meta) + ["extra"]))] = draw(META_TEXT)
    header["__metadata__"] = meta
    return target, kind, _join_safetensors(header, body)


def _foreign(d: Path, fmt: str, keep_ours: bool) -> None:
    """A LoRA file in ``fmt`` with trigger words (kohya: ss_tag_frequency JSON), as another tool writes it
    (no lora4diffusion entry) unless ``keep_ours``."""
    from safetensors import safe_open

    from lora4diffusion.formats import write_lora
    from lora4diffusion.lora.adapters import adapter_from_model

    model = copy.deepcopy(BASE)
    inject_lora(model, "attention", 2, 2.0)
    adapter = adapter_from_model(model)
    adapter.extra = {"trigger_words": json.dumps(["sks", "bold digit"])}
    path = write_lora(adapter, fmt, d, title="fuzz")
    if not keep_ours:
        with safe_open(str(path), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if not k.startswith("lora4diffusion")}
        tensors = st_load(path.read_bytes())
        path.write_bytes(st_save(tensors, metadata=meta))


def _read_any_folder(d: Path) -> None:
    from lora4diffusion.formats import read_any

    load_adapter(copy.deepcopy(BASE), read_any(d))


def build_mixed_folder(d: Path) -> None:
    """Good items of every kind side by side: a model, a VAE, ours, PEFT, diffusers and kohya adapters."""
    build_model(d / "model")
    build_vae(d / "vae")
    build_adapter(d / "ours")
    build_peft(d / "peft")
    _foreign(d / "diffusers", "diffusers", keep_ours=False)
    _foreign(d, "kohya", keep_ours=False)


def list_and_info(d: Path) -> None:
    """`list` over the folder never stops: every item has its row; undamaged items (compared with the
    fixture) read fine in both `list` and `info`; a damaged one is a row with a one-line problem, and `info`
    on it is a one-line UserError (raised here, so the harness counts it)."""
    from lora4diffusion.inventory import info, listing

    valid = d.parent / "valid"
    items = sorted(p.name for p in valid.iterdir())
    damaged = {n for n in items for q in [valid / n, *(valid / n).rglob("*")]
               if q.is_file() and q.read_bytes() != (d / q.relative_to(valid)).read_bytes()}
    rows = {Path(r["path"]).name: r for r in listing([d]) if Path(r["path"]).parent == d}
    assert set(rows) == set(items), (sorted(rows), items)
    problems = []
    for name in items:
        if "problem" in rows[name]:
            assert name in damaged and "\n" not in rows[name]["problem"], rows[name]
            problems.append(rows[name]["problem"])
        try:
            info(d / name)
        except UserError as e:
            assert name in damaged, (name, str(e))
            problems.append(str(e))
    if problems:
        raise UserError(problems[0])


MIXED_TARGETS = ("model/config.json", "model/model.safetensors", "vae/config.json",
                 "ours/adapter.safetensors", "peft/adapter_config.json", "peft/adapter_model.safetensors",
                 "diffusers/pytorch_lora_weights.safetensors", "fuzz.safetensors")
FOREIGN_READERS = {  # name: (build, read, targets, damages)
    "kohya LoRA file from elsewhere (alphas, metadata)": (
        lambda d: _foreign(d, "kohya", keep_ours=False), read_lora_file, ("fuzz.safetensors",),
        foreign_damage),
    "kohya LoRA file with our settings entry": (
        lambda d: _foreign(d, "kohya", keep_ours=True), read_lora_file, ("fuzz.safetensors",),
        foreign_damage),
    "diffusers LoRA file from elsewhere (lora_adapter_metadata)": (
        lambda d: _foreign(d, "diffusers", keep_ours=False), read_lora_file,
        ("pytorch_lora_weights.safetensors",), foreign_damage),
    "diffusers LoRA file with our settings entry": (
        lambda d: _foreign(d, "diffusers", keep_ours=True), read_lora_file,
        ("pytorch_lora_weights.safetensors",), foreign_damage),
    "PEFT folder as --lora reads it (adapter_config.json)": (
        build_peft, _read_any_folder, ("adapter_config.json",), foreign_damage),
    "prompt model folder (configs: types, huge numbers, deep nesting)": (
        build_prompt_model, read_prompt_model, ("config.json", "vae/config.json", "tokenizer/config.json"),
        foreign_damage),
    "list/info over a mixed folder (damaged foreign metadata)": (
        build_mixed_folder, list_and_info, MIXED_TARGETS, foreign_damage),
    "list/info over a mixed folder (damaged bytes, JSON, tensors)": (
        build_mixed_folder, list_and_info, MIXED_TARGETS, damage),
}


# list/info read every item of the folder per case (a model, a VAE, adapters of every layout and method):
# half the cases, so each of the two stays near 7 s on 2 cores
FEWER = {name: EXAMPLES // 2 for name in FOREIGN_READERS if name.startswith("list/info")}


@pytest.mark.parametrize("name", sorted(FOREIGN_READERS))
def test_fuzz_files_from_elsewhere(name, tmp_path):
    build, read, targets, damages = FOREIGN_READERS[name]
    fuzz_a_reader(name, build, read, targets, tmp_path, examples=FEWER.get(name, EXAMPLES), damages=damages)


def test_the_harness_fails_on_a_foreign_exception(tmp_path):
    """fuzz_a_reader must not pass a reader that raises anything but UserError."""
    def fragile(d: Path) -> None:
        if (d / "x.json").read_bytes() != b'{"a": 1}':
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fuzz_a_reader("fragile", lambda d: (d / "x.json").write_bytes(b'{"a": 1}'), fragile, ("x.json",),
                      tmp_path, examples=5)


def test_the_harness_fails_on_a_blown_memory(tmp_path):
    """A reader that allocates 4 GiB for a damaged file fails under fuzz_a_reader's address-space cap."""
    def greedy(d: Path) -> None:
        if (d / "x.json").read_bytes() != b'{"a": 1}':
            np.ones(1 << 32, np.uint8)

    with pytest.raises(MemoryError):
        fuzz_a_reader("greedy", lambda d: (d / "x.json").write_bytes(b'{"a": 1}'), greedy, ("x.json",),
                      tmp_path, examples=5)


def test_the_harness_fails_on_a_hang(tmp_path):
    def stuck(d: Path) -> None:
        if (d / "x.json").read_bytes() != b'{"a": 1}':
            time.sleep(60)

    with pytest.raises(Hang):
        fuzz_a_reader("stuck", lambda d: (d / "x.json").write_bytes(b'{"a": 1}'), stuck, ("x.json",),
                      tmp_path, examples=5, seconds=0.5)
