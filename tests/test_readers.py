"""Every file we read is checked against a schema before use ("validate at the door").

One test per class of bad file the issue lists, each asserting a UserError whose one line names the file and
the problem: model config.json (types, ranges), safetensors tensors (names, shapes, dtypes, finiteness),
adapter metadata and fingerprints, train_state metadata and tensors, PEFT folders, SVD on non-finite weights,
IDX sets, .npz samples with huge declared shapes, image bombs, the CSV style table, classifier files, and
permission errors. tests/test_fuzz.py throws random damage at the same readers.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lora4diffusion.checkpoint import load_tensors, read_json, read_metadata
from lora4diffusion.classifier import Classifier, ClassifierConfig, load_classifier
from lora4diffusion.data import load_mnist, read_idx
from lora4diffusion.diffusion import DiffusionConfig, NoiseSchedule
from lora4diffusion.errors import UserError
from lora4diffusion.evaluate import load_samples
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.lora.adapters import (
    export_peft,
    import_peft,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lora4diffusion.lora.extract import extract_lora, resize_adapter
from lora4diffusion.lora.layers import inject_lora
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.styles import load_style_data
from lora4diffusion.training.loop import Trainer
from lora4diffusion.training.run import STATE_NAME, TrainConfig

CFG = UNetConfig(
    image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), context_dim=32
)


def one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def make_base(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(CFG)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    save_model(d, make_base(), DiffusionConfig())
    return d


def copy_model(src: Path, dst: Path, config=None, tensors=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text()) if config is None else config
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(src / "model.safetensors")) if tensors is None else tensors,
              str(dst / "model.safetensors"))
    return dst


# ------------------------------------------------------------------ model config.json
@pytest.mark.parametrize("section,key,value,needle", [
    ("unet", "base_channels", "32", "base_channels must be an integer"),
    ("unet", "groups", 0, "groups must be between"),
    ("unet", "head_dim", 0, "head_dim must be between"),
    ("unet", "head_dim", 5, "splits"),
    ("unet", "groups", 3, "does not divide"),
    ("unet", "channel_mults", "12", "channel_mults must be a list"),
    ("unet", "attn_levels", [7], "attn_levels entry"),
    ("unet", "dropout", -1, "dropout"),
    ("unet", "base_channels", 10**9, "base_channels must be between"),
    ("unet", "num_res_blocks", True, "num_res_blocks must be an integer"),
    ("diffusion", "timesteps", 999.5, "timesteps must be an integer"),
    ("diffusion", "timesteps", 1e12, "timesteps must be an integer"),
    ("diffusion", "timesteps", 10**12, "timesteps must be between"),
    ("diffusion", "schedule", 3, "schedule must be a string"),
    ("diffusion", "beta_end", "0.02", "beta_end must be a number"),
    ("diffusion", "surprise", 1, "unknown diffusion config keys"),
])
def test_model_config_types_and_ranges(model_dir, tmp_path, section, key, value, needle):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg[section][key] = value
    bad = copy_model(model_dir, tmp_path / "bad", config=cfg)
    with pytest.raises(UserError) as e:
        load_model(bad)
    one_line(e, str(bad / "config.json"), needle)


def test_config_json_non_standard_constants_and_sections(model_dir, tmp_path):
    text = (model_dir / "config.json").read_text().replace('"beta_end": 0.02', '"beta_end": NaN')
    bad = copy_model(model_dir, tmp_path / "nan")
    (bad / "config.json").write_text(text)
    with pytest.raises(UserError) as e:
        load_model(bad)
    one_line(e, "config.json", "NaN is not a JSON number")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["unet"] = [1, 2]
    with pytest.raises(UserError) as e:
        load_model(copy_model(model_dir, tmp_path / "list", config=cfg))
    one_line(e, "'unet' must be a JSON object")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["version"] = True  # True == 1 in Python
    with pytest.raises(UserError) as e:
        load_model(copy_model(model_dir, tmp_path / "bool", config=cfg))
    one_line(e, "unsupported format version True")


def test_config_dataclasses_check_python_callers_too():
    with pytest.raises(UserError, match="groups must be between"):
        UNetConfig(groups=0)
    with pytest.raises(UserError, match="base_channels must be an integer"):
        UNetConfig(base_channels="32")
    with pytest.raises(UserError, match="timesteps must be an integer"):
        DiffusionConfig(timesteps=2.5)
    with pytest.raises(UserError, match="beta_start must be a finite number"):
        DiffusionConfig(beta_start=float("nan"))
    with pytest.raises(UserError, match="image size 0 must be 8..2048"):
        UNetConfig(image_size=0)


# ------------------------------------------------------------------ safetensors tensors
@pytest.mark.parametrize("damage,needle", [
    ("int64", "has dtype I64"),
    ("bool", "has dtype BOOL"),
    ("nan", "holds NaN or infinite values"),
    ("inf", "holds NaN or infinite values"),
    ("shape", "has shape"),
    ("missing", "missing"),
    ("extra", "unexpected"),
])
def test_model_weights_names_shapes_dtypes_finiteness(model_dir, tmp_path, damage, needle):
    tensors = load_file(str(model_dir / "model.safetensors"))
    key = "conv_in.weight"
    if damage == "int64":
        tensors[key] = tensors[key].long()
    elif damage == "bool":
        tensors[key] = tensors[key] > 0
    elif damage in ("nan", "inf"):
        tensors[key][0, 0, 0, 0] = float(damage)
    elif damage == "shape":
        tensors[key] = tensors[key][:1]
    elif damage == "missing":
        del tensors[key]
    else:
        tensors["surprise"] = torch.zeros(1)
    bad = copy_model(model_dir, tmp_path / damage, tensors=tensors)
    with pytest.raises(UserError) as e:
        load_model(bad)
    msg = one_line(e, str(bad / "model.safetensors"), needle)
    if damage in ("int64", "bool", "nan", "inf", "shape"):
        assert key in msg


def test_a_huge_config_is_checked_against_the_file_before_allocating(model_dir, tmp_path):
    """base_channels 2048 with channel_mults (1, 64) would be ~10^10 parameters: built on the meta device and
    compared with the file's header, it is refused without allocating them."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["unet"].update(base_channels=2048, channel_mults=[1, 64], groups=8, head_dim=2048)
    bad = copy_model(model_dir, tmp_path / "huge", config=cfg)
    with pytest.raises(UserError) as e:
        load_model(bad)
    one_line(e, "model.safetensors", "needs")


# ------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapter")
    model = make_base()
    inject_lora(model, "attention", 4, 4.0)
    save_adapter(model, d)
    return d


def rewrite_adapter(src: Path, dst: Path, meta_update=None, tensor_update=None) -> Path:
    path = src / "adapter.safetensors"
    meta, tensors = read_metadata(path), load_file(str(path))
    meta.update(meta_update or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    if tensor_update:
        tensor_update(tensors)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter.safetensors"), metadata=meta)
    return dst


@pytest.mark.parametrize("update,needle", [
    ({"alpha": "1e30"}, "alpha must be > 0 and <= 1e+06"),
    ({"alpha": "nan"}, "alpha must be a finite number"),
    ({"alpha": "-4"}, "alpha must be > 0"),
    ({"rank": "4.7"}, "rank must be an integer"),
    ({"rank": "abc"}, "rank must be an integer"),
    ({"rank": "0"}, "rank must be between"),
    ({"dropout": "2"}, "dropout must be"),
    ({"scale_rule": "maybe"}, "scale_rule must be one of"),
    ({"targets": "[not json"}, "targets must be a JSON list"),
    ({"targets": "[]"}, "targets"),
    ({"base_fingerprint": "xyz"}, "base_fingerprint must be 64 hex digits"),
    ({"alpha": None}, "missing alpha"),
])
def test_adapter_metadata_is_checked(adapter_dir, tmp_path, update, needle):
    bad = rewrite_adapter(adapter_dir, tmp_path / "bad", meta_update=update)
    with pytest.raises(UserError) as e:
        read_adapter(bad)
    one_line(e, str(bad / "adapter.safetensors"), needle)


@pytest.mark.parametrize("damage,needle", [
    ("int64", "has dtype I64"), ("nan", "holds NaN"), ("inf", "holds NaN"),
])
def test_adapter_tensors_dtype_and_finiteness(adapter_dir, tmp_path, damage, needle):
    def hurt(t):
        key = sorted(t)[0]
        if damage == "int64":
            t[key] = t[key].long()
        else:
            t[key][0, 0] = float(damage)
    bad = rewrite_adapter(adapter_dir, tmp_path / "bad", tensor_update=hurt)
    with pytest.raises(UserError) as e:
        read_adapter(bad)
    one_line(e, "adapter.safetensors", needle)


def test_fingerprint_error_names_the_file(adapter_dir):
    with pytest.raises(UserError) as e:
        load_adapter(make_base(seed=1), adapter_dir)
    one_line(e, str(adapter_dir), "different base model")


# ------------------------------------------------------------------ PEFT folders
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, adapter_dir) -> Path:
    d = tmp_path_factory.mktemp("peft")
    export_peft(adapter_dir, d)
    return d


@pytest.mark.parametrize("update,needle", [
    ({"lora_alpha": -4}, "lora_alpha must be > 0"),
    ({"lora_alpha": 1e30}, "lora_alpha must be > 0 and <= 1e+06"),
    ({"lora_dropout": 2}, "lora_dropout must be"),
    ({"r": 4.7}, "r must be an integer"),
    ({"r": "4"}, "r must be an integer"),
    ({"use_rslora": "no"}, "use_rslora must be true or false"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa' is not supported"),
    ({"init_lora_weights": 1}, "init_lora_weights 1 is not supported"),
    ({"target_modules": 7}, "target_modules must be"),
])
def test_peft_config_is_checked(peft_dir, tmp_path, update, needle):
    bad = tmp_path / "peft"
    bad.mkdir()
    cfg = {**json.loads((peft_dir / "adapter_config.json").read_text()), **update}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError) as e:
        import_peft(bad)
    one_line(e, str(bad / "adapter_config.json"), needle)


def test_peft_nan_alpha_and_modules_the_base_lacks(peft_dir, tmp_path):
    bad = tmp_path / "nan"
    bad.mkdir()
    text = (peft_dir / "adapter_config.json").read_text()
    cfg = json.loads(text)
    nan_text = text.replace(f'"lora_alpha": {cfg["lora_alpha"]}', '"lora_alpha": NaN')
    assert nan_text != text
    (bad / "adapter_config.json").write_text(nan_text)
    (bad / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError) as e:
        import_peft(bad)
    one_line(e, "adapter_config.json", "NaN is not a JSON number")

    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(text)
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    tensors = {k.replace("mid_attn", "no_such_block"): v for k, v in tensors.items()}
    save_file(tensors, str(other / "adapter_model.safetensors"))
    import_peft(other)  # without a base nothing says the modules are wrong ...
    with pytest.raises(UserError) as e:  # ... with one, they are refused before anything is written
        import_peft(other, base_model=make_base())
    one_line(e, "adapter_model.safetensors", "no_such_block", "does not exist in this model")


# ------------------------------------------------------------------ SVD on non-finite weights
def test_resize_and_extract_refuse_non_finite_weights(adapter_dir):
    adapter = read_adapter(adapter_dir)
    key = sorted(adapter.tensors)[0]
    adapter.tensors[key] = adapter.tensors[key].clone()
    adapter.tensors[key][0, 0] = float("inf")
    with pytest.raises(UserError) as e:
        resize_adapter(adapter, 2)
    one_line(e, "NaN or infinite", "module ")
    base, tuned = make_base(), make_base()
    with torch.no_grad():
        tuned.mid_attn.attn1.to_q.weight[0, 0] = float("nan")
    with pytest.raises(UserError) as e:
        extract_lora(base, tuned, 2, "attention")
    one_line(e, "mid_attn.attn1.to_q", "NaN or infinite")


# ------------------------------------------------------------------ train_state.safetensors
def tiny_trainer(run_dir: Path, steps: int = 2, run_info: dict | None = None, **changes) -> Trainer:
    torch.manual_seed(0)
    model = UNet(CFG)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.arange(8) % 10
    cfg = TrainConfig(steps=steps, batch_size=4, warmup=1, checkpoint_every=1, sample_every=0, bf16=False,
                      log_every=1)
    cfg = TrainConfig(**{**cfg.__dict__, **changes})
    return Trainer(model, NoiseSchedule(DiffusionConfig()), images, labels, cfg, run_dir,
                   export=lambda m, d: None, device="cpu", run_info=run_info or {"data": "digits A"})


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    tiny_trainer(run).fit(progress=False)
    return run / STATE_NAME


@pytest.mark.parametrize("case,needle", [
    ("step abc", "step must be an integer"),
    ("step -5", "step must be between"),
    ("bad run json", "run is not JSON"),
    ("run not object", "run must be a JSON object"),
    ("wrong shape", "has shape"),
    ("missing optimizer entry", "missing"),
    ("int param", "has dtype I64"),
    ("nan ema", "holds NaN"),
    ("train_seconds inf", "train_seconds must be a finite number"),
])
def test_train_state_is_checked_on_resume(state_file, tmp_path, case, needle):
    meta, tensors = read_metadata(state_file), load_file(str(state_file))
    param = next(k for k in tensors if k.startswith("param."))
    if case == "step abc":
        meta["step"] = "abc"
    elif case == "step -5":
        meta["step"] = "-5"
    elif case == "bad run json":
        meta["run"] = "{not json"
    elif case == "run not object":
        meta["run"] = "[1]"
    elif case == "wrong shape":
        tensors[param] = tensors[param].flatten()[:3].clone()
    elif case == "missing optimizer entry":
        del tensors[next(k for k in tensors if k.startswith("optim.") and k.endswith(".exp_avg_sq"))]
    elif case == "int param":
        tensors[param] = tensors[param].long()
    elif case == "nan ema":
        ema = next(k for k in tensors if k.startswith("ema."))
        tensors[ema] = torch.full_like(tensors[ema], float("nan"))
    else:
        meta["train_seconds"] = "inf"
    run = tmp_path / "run"
    run.mkdir()
    save_file(tensors, str(run / STATE_NAME), metadata=meta)
    trainer = tiny_trainer(run, steps=4)
    with pytest.raises(UserError) as e:
        trainer.resume()
    one_line(e, str(run / STATE_NAME), needle)


@pytest.mark.parametrize("changes,run_info,needle", [
    ({"batch_size": 8}, None, "batch_size 4 -> 8"),
    ({"lr": 0.5}, None, "lr 0.001 -> 0.5"),
    ({"seed": 3}, None, "seed 0 -> 3"),
    ({}, {"data": "digits B"}, "data 'digits A' -> 'digits B'"),
])
def test_resume_refuses_changed_settings(state_file, tmp_path, changes, run_info, needle):
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_NAME).write_bytes(state_file.read_bytes())
    with pytest.raises(UserError) as e:
        tiny_trainer(run, steps=4, run_info=run_info, **changes).resume()
    one_line(e, str(run / STATE_NAME), "other data or settings", needle)
    tiny_trainer(run, steps=4, log_every=7, checkpoint_every=3).resume()  # more steps, other intervals: fine


def test_intact_train_state_resumes(state_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_NAME).write_bytes(state_file.read_bytes())
    trainer = tiny_trainer(run, steps=3)
    trainer.resume()
    assert trainer.step == 2 and trainer.fit(progress=False)["step"] == 3


# ------------------------------------------------------------------ IDX, npz, images, CSV
def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x00000801 if arr.ndim == 1 else 0x00000803
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def test_idx_with_zero_training_digits(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, np.uint8)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 28, 28), np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(20, dtype=np.uint8) % 10))
    with pytest.raises(UserError) as e:
        load_mnist(str(tmp_path), heldout_per_class=1)
    one_line(e, "train-images-idx3-ubyte", "0 training digits")


def test_idx_huge_declared_size_and_gzip_bomb(tmp_path):
    huge = tmp_path / "huge"
    huge.write_bytes((0x803).to_bytes(4, "big") + (10**6).to_bytes(4, "big") + (28000).to_bytes(4, "big")
                     + (28000).to_bytes(4, "big"))
    with pytest.raises(UserError) as e:
        read_idx(huge)
    one_line(e, "huge", "over the 1024 MiB limit")
    import gzip
    bomb = tmp_path / "bomb.gz"  # declares 10 MB and decompresses to 50 MB: only 10 MB + 1 is ever read
    with gzip.open(bomb, "wb") as f:
        f.write((0x803).to_bytes(4, "big") + (10**4).to_bytes(4, "big") + (1000).to_bytes(4, "big")
                + (1).to_bytes(4, "big"))
        f.write(b"\0" * 50_000_000)
    with pytest.raises(UserError) as e:
        read_idx(bomb)
    one_line(e, "bomb.gz", "oversized")


def npz_with_header(path: Path, shape: tuple, data: bytes = b"", dtype: str = "<f4") -> Path:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", npy)
        buf = np.lib.format
        import io
        b = io.BytesIO()
        buf.write_array(b, np.zeros(3, np.int64))
        z.writestr("labels.npy", b.getvalue())
    return path


def test_npz_header_claiming_a_huge_shape(tmp_path):
    path = npz_with_header(tmp_path / "huge.npz", (10**12, 28, 28))
    with pytest.raises(UserError) as e:
        load_samples(path)
    one_line(e, "huge.npz", "over the 512 MiB limit")
    path = npz_with_header(tmp_path / "short.npz", (3, 28, 28), b"\0" * 100)
    with pytest.raises(UserError) as e:
        load_samples(path)
    one_line(e, "short.npz", "truncated or corrupt")
    np.save(tmp_path / "bare.npy", np.zeros(3))
    (tmp_path / "bare.npz").write_bytes((tmp_path / "bare.npy").read_bytes())
    with pytest.raises(UserError) as e:
        load_samples(tmp_path / "bare.npz")
    one_line(e, "not an .npz archive")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (and one tiny IDAT): what a decompression bomb looks like
    before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("size,needle", [(30000, "possible decompression bomb"), (5000, "5000x5000")])
def test_huge_images_are_called_too_large(tmp_path, size, needle):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "big.png").write_bytes(png_header(size, size))
    with pytest.raises(UserError) as e:
        load_style_data(str(tmp_path))
    one_line(e, "big.png", "image too large", needle)


def test_csv_table_with_a_nul_path(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("path,label\nimg\0.png,3\n")
    with pytest.raises(UserError) as e:
        load_style_data(str(table))
    one_line(e, "t.csv", "NUL")


# ------------------------------------------------------------------ classifier files
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    from lora4diffusion.checkpoint import save_tensors, write_json
    from lora4diffusion.classifier import CONFIG_NAME, FORMAT, VERSION, WEIGHTS_NAME

    d = tmp_path_factory.mktemp("clf")
    model = Classifier(ClassifierConfig(channels=(4, 4, 4), feature_dim=8))
    save_tensors(d / WEIGHTS_NAME, {k: v.float() for k, v in model.state_dict().items()})
    write_json(d / CONFIG_NAME, {"format": FORMAT, "version": VERSION,
                                 "classifier": {"channels": [4, 4, 4], "feature_dim": 8, "dropout": 0.0}})
    return d


@pytest.mark.parametrize("case,needle", [
    ("string channel", "channels entry must be an integer"),
    ("two channels", "channels must be 3 integers"),
    ("float feature_dim", "feature_dim must be an integer"),
    ("unknown key", "malformed classifier config"),
    ("int weight", "has dtype I64"),
    ("negative variance", "negative variances"),
    ("nan weight", "holds NaN"),
])
def test_classifier_files_are_checked(classifier_dir, tmp_path, case, needle):
    d = tmp_path / "clf"
    d.mkdir()
    info = json.loads((classifier_dir / "classifier.json").read_text())
    tensors = load_file(str(classifier_dir / "classifier.safetensors"))
    c = info["classifier"]
    if case == "string channel":
        c["channels"] = ["4", 4, 4]
    elif case == "two channels":
        c["channels"] = [4, 4]
    elif case == "float feature_dim":
        c["feature_dim"] = 8.5
    elif case == "unknown key":
        c["surprise"] = 1
    elif case == "int weight":
        tensors["head.1.weight"] = tensors["head.1.weight"].long()
    elif case == "negative variance":
        tensors["body.0.1.running_var"] = -torch.ones_like(tensors["body.0.1.running_var"])
    else:
        tensors["head.1.weight"][0, 0] = float("nan")
    (d / "classifier.json").write_text(json.dumps(info))
    save_file(tensors, str(d / "classifier.safetensors"))
    with pytest.raises(UserError) as e:
        load_classifier(d)
    one_line(e, str(d), needle)


def test_intact_classifier_loads(classifier_dir):
    assert load_classifier(classifier_dir).cfg.channels == (4, 4, 4)


# ------------------------------------------------------------------ permission denied
def _as_unprivileged(fn) -> str:
    """Run ``fn`` where a 0o000 file really is unreadable: directly, or (as root, who may read anything)
    in a forked child that drops to uid/gid 65534. Returns the UserError message, or what else happened."""
    if os.geteuid() != 0:
        try:
            fn()
        except UserError as e:
            return str(e)
        return "no error"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            out = "no error"
        except UserError as e:
            out = str(e)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            out = f"{type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def open_dir():
    """A folder everyone may enter (pytest's tmp folders are 0700: a dropped-privilege child could not even
    look inside, and the file modes would not be what is tested)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="l4d-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_permission_errors_say_permission_denied(model_dir, open_dir):
    tmp_path = open_dir
    d = copy_model(model_dir, tmp_path / "locked")
    os.chmod(d, 0o755)
    for name in ("model.safetensors", "config.json"):
        os.chmod(d / name, 0o000)
    idx = tmp_path / "t.idx"
    idx.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, np.int64))
    style = tmp_path / "style"
    (style / "3").mkdir(parents=True)
    os.chmod(style, 0o755)
    os.chmod(style / "3", 0o755)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(style / "3" / "a.png")
    closed = tmp_path / "closed"  # a folder that may not be entered: what is inside cannot even be looked at
    copy_model(model_dir, closed)
    os.chmod(closed, 0o700)
    for f in (idx, npz, style / "3" / "a.png"):
        os.chmod(f, 0o000)
    for fn, where in [(lambda: load_tensors(d / "model.safetensors"), "model.safetensors"),
                      (lambda: read_json(d / "config.json"), "config.json"),
                      (lambda: read_metadata(d / "model.safetensors"), "model.safetensors"),
                      (lambda: read_idx(idx), "t.idx"),
                      (lambda: load_samples(npz), "s.npz"),
                      (lambda: load_style_data(str(style)), "a.png"),
                      (lambda: load_model(closed / "model"), "closed"),
                      (lambda: load_samples(closed / "x.npz"), "closed"),
                      (lambda: load_style_data(str(closed / "x")), "closed"),
                      (lambda: load_mnist(str(closed / "x")), "closed")]:
        msg = _as_unprivileged(fn)
        assert where in msg and "permission denied" in msg and "No such file" not in msg, msg


# ------------------------------------------------------------------ through the command line
def test_cli_bad_files_are_one_line_exit_2_and_write_nothing(model_dir, peft_dir, tmp_path, capsys):
    from lora4diffusion import cli

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["unet"]["groups"] = 0
    bad = copy_model(model_dir, tmp_path / "bad", config=cfg)
    peft = tmp_path / "pissa"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(
        {**json.loads((peft_dir / "adapter_config.json").read_text()), "init_lora_weights": "pissa"}))
    (peft / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    huge = npz_with_header(tmp_path / "huge.npz", (10**12, 28, 28))
    for argv in (["sample", "--checkpoint", str(bad), "--steps", "2", "--out", str(tmp_path / "o1")],
                 ["import-peft", "--peft", str(peft), "--checkpoint", str(model_dir),
                  "--out", str(tmp_path / "o2")],
                 ["evaluate", "--samples", str(huge)]):
        capsys.readouterr()
        assert cli.main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lora4diffusion {argv[0]}: error: "), err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
