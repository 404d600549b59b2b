"""Files from elsewhere are checked like our own: foreign LoRA files (kohya, diffusers, PEFT) go through the
same checks as adapter.safetensors; `list` / `info` show what they can and mark what they cannot read; the
parts of a model folder are read only from inside it; a model whose UNet does not fit its VAE's latents is
refused on load; and the messages about files say what was expected (no Python exception text, no
"format None", no "file not found" for a layout another command reads).

Every case asserts one line naming the file and the problem, exit 2 through the command line, and nothing
written. tests/test_fuzz.py throws random damage at the same readers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora4diffusion.cli import main
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.formats import read_any, write_lora
from lora4diffusion.formats.diffusers_unet import unet_config_from_diffusers, unet_config_to_diffusers
from lora4diffusion.formats.ours import blob
from lora4diffusion.inventory import listing
from lora4diffusion.lora.adapters import adapter_from_model, export_peft, load_adapter, read_adapter
from lora4diffusion.lora.layers import inject_lora
from lora4diffusion.models.unet import UNet, UNetConfig
from lora4diffusion.pipeline import Pipeline

CFG = UNetConfig(
    image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), context_dim=32
)


def make_base() -> UNet:
    torch.manual_seed(0)
    model = UNet(CFG)
    nn.init.normal_(model.conv_out.weight, std=0.1)
    return model.eval()


BASE = make_base()


def one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Error:" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def refused_by_cli(capsys, argv: list[str], *needles: str) -> str:
    """``argv`` exits 2 with one stderr line holding ``needles``; returns it."""
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lora4diffusion {argv[0]}: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny base folder and one adapter for it in each layout; the diffusers and kohya files as another
    tool writes them (without our ``lora4diffusion`` metadata entry)."""
    root = tmp_path_factory.mktemp("foreign")
    save_model(root / "base", BASE, DiffusionConfig())
    model = copy.deepcopy(BASE)
    inject_lora(model, "attention", 2, 2.0)
    adapter = adapter_from_model(model)
    adapter.save(root / "ours")
    export_peft(adapter, root / "peft")
    out = {"base": root / "base", "ours": root / "ours", "peft": root / "peft", "blob": blob(adapter)}
    for fmt in ("kohya", "diffusers"):
        written = write_lora(adapter, fmt, root / fmt, title="a")
        meta = {k: v for k, v in _meta(written).items() if not k.startswith("lora4diffusion")}
        save_file(load_file(str(written)), str(written), metadata=meta)
        out[fmt] = written
    return out


def rewrite(src: Path, dst: Path, tensors=None, meta=None) -> Path:
    """A copy of safetensors file ``src`` at ``dst`` with ``tensors`` / ``meta`` entries replaced (None
    values: removed)."""
    t, m = load_file(str(src)), _meta(src)
    for k, v in (tensors or {}).items():
        t.pop(k) if v is None else t.__setitem__(k, v)
    for k, v in (meta or {}).items():
        m.pop(k) if v is None else m.__setitem__(k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst), metadata=m)
    return dst


def _alpha_key(path: Path) -> str:
    return next(k for k in load_file(str(path)) if k.endswith(".alpha"))


def _cast(path: Path, suffix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` ending in ``suffix``, rounded and cast to ``dtype`` (same shapes)."""
    return {k: (t * 100).round().to(dtype) for k, t in load_file(str(path)).items() if k.endswith(suffix)}


DEEP = "[" * 100_000 + "]" * 100_000
KOHYA_CASES = [  # (tensor changes given the file, metadata changes, what the message names)
    ("alpha of 2 elements", lambda p: {_alpha_key(p): torch.tensor([1.0, 2.0])}, {}, "must hold one number"),
    ("alpha of shape (2, 2)", lambda p: {_alpha_key(p): torch.ones(2, 2)}, {}, "must hold one number"),
    ("alpha 1e30", lambda p: {_alpha_key(p): torch.tensor(1e30)}, {}, "<= 1e+06"),
    ("alpha -4", lambda p: {_alpha_key(p): torch.tensor(-4.0)}, {}, "> 0"),
    ("alpha bool", lambda p: {_alpha_key(p): torch.tensor(True)}, {}, "dtype BOOL"),
    ("int64 lora_down", lambda p: _cast(p, ".lora_down.weight", torch.int64), {}, "dtype I64"),
    ("int32 lora_up", lambda p: _cast(p, ".lora_up.weight", torch.int32), {}, "dtype I32"),
    ("our entry with rank 4.7", lambda p: {}, {"rank": "4.7"}, "rank must be an integer, got '4.7'"),
    ("our entry with alpha nan", lambda p: {}, {"alpha": "nan"}, "alpha must be a finite number"),
    ("our entry with alpha 1e30", lambda p: {}, {"alpha": "1e30"}, "alpha must be > 0 and <= 1e+06"),
    ("our entry with rank 2 as a number", lambda p: {}, {"rank": 2}, "'rank' must be text, got 2"),
    ("our entry with a bad fingerprint", lambda p: {}, {"base_fingerprint": "x"}, "base_fingerprint"),
    ("our entry a list", lambda p: {}, "[1, 2]", "expected a JSON object"),
    ("our entry nested 100000 deep", lambda p: {}, DEEP, "not JSON"),
]
DIFFUSERS_CASES = [  # lora_adapter_metadata as found in the file, what the message names
    ("a JSON list", "[1, 2]", "lora_adapter_metadata must be a JSON object"),
    ("lora_alpha 'abc'", json.dumps({"unet.lora_alpha": "abc"}),
     "unet.lora_alpha must be a number, got 'abc'"),
    ("lora_dropout 'x'", json.dumps({"unet.lora_dropout": "x"}), "unet.lora_dropout must be a number"),
    ("lora_dropout 1", json.dumps({"unet.lora_dropout": 1}), "unet.lora_dropout must be < 1"),
    ("r 2**70", json.dumps({"unet.r": 2**70}), "unet.r must be between 1 and"),
    ("r as text", json.dumps({"unet.r": "2"}), "unet.r must be an integer"),
    ("lora_alpha 1e400", '{"unet.lora_alpha": 1e400}', "unet.lora_alpha must be a finite number"),
    ("lora_alpha 1e30", json.dumps({"unet.lora_alpha": 1e30}), "unet.lora_alpha must be > 0"),
    ("use_rslora 'no'", json.dumps({"unet.use_rslora": "no"}), "unet.use_rslora must be true or false"),
    ("init pissa", json.dumps({"unet.init_lora_weights": "pissa"}), "pissa"),
    ("use_dora", json.dumps({"unet.use_dora": True}), "unet.use_dora"),
    ("bare keys", json.dumps({"lora_alpha": [1]}), "lora_alpha must be a number"),
    ("a section that is a list", json.dumps({"unet.r": 2, "text_encoder.lora_alpha": {"a": 1}}),
     "text_encoder.lora_alpha"),
    ("nested 100000 deep", DEEP, "is not JSON"),
    ("not JSON", "{", "is not JSON"),
]


@pytest.mark.parametrize("name,tensors,meta,needle", KOHYA_CASES, ids=[c[0] for c in KOHYA_CASES])
def test_kohya_values_go_through_our_checks(files, tmp_path, name, tensors, meta, needle):
    if meta:  # our settings entry, changed (a dict) or replaced (text)
        entry = meta if isinstance(meta, str) else json.dumps({**json.loads(files["blob"]), **meta})
        meta = {"lora4diffusion": entry}
    bad = rewrite(files["kohya"], tmp_path / "x.safetensors", tensors(files["kohya"]), meta)
    with pytest.raises(UserError) as e:
        load_adapter(copy.deepcopy(BASE), read_any(bad))
    one_line(e, str(bad), needle)


@pytest.mark.parametrize("name,text,needle", DIFFUSERS_CASES, ids=[c[0] for c in DIFFUSERS_CASES])
def test_diffusers_metadata_goes_through_the_peft_config_checks(files, tmp_path, name, text, needle):
    bad = rewrite(files["diffusers"], tmp_path / "d" / "pytorch_lora_weights.safetensors",
                  meta={"lora_adapter_metadata": text})
    with pytest.raises(UserError) as e:
        read_any(bad.parent)
    one_line(e, str(bad), needle)


def test_intact_foreign_files_still_load_and_integer_alphas_are_read_as_kohya_does(files, tmp_path, caplog):
    for fmt in ("ours", "peft", "kohya", "diffusers"):
        load_adapter(copy.deepcopy(BASE), read_any(files[fmt]))
    key = _alpha_key(files["kohya"])
    as_int = rewrite(files["kohya"], tmp_path / "i.safetensors",
                     {k: torch.tensor(2, dtype=torch.int64) for k in load_file(str(files["kohya"]))
                      if k.endswith(".alpha")})
    assert read_any(as_int).alpha == 2.0  # sd-scripts, ComfyUI and diffusers read alpha with .item()
    zero = rewrite(files["kohya"], tmp_path / "z.safetensors", {key: torch.tensor(0.0)})
    assert read_any(zero).alpha == 2.0 and "alpha 0" in caplog.text  # sd-scripts: alpha 0 means alpha = r


def test_foreign_lora_problems_through_the_command_line(files, tmp_path, capsys):
    """sample --lora and info on a kohya file with a 2-element alpha and on diffusers metadata that is a
    list: one line, exit 2, no --out (tracebacks before)."""
    kohya = rewrite(files["kohya"], tmp_path / "k" / "x.safetensors",
                    {_alpha_key(files["kohya"]): torch.tensor([1.0, 2.0])})
    diff = rewrite(files["diffusers"], tmp_path / "d" / "pytorch_lora_weights.safetensors",
                   meta={"lora_adapter_metadata": "[1, 2]"})
    for bad, needle in ((kohya, "must hold one number"), (diff, "must be a JSON object")):
        for target in (bad, bad.parent):
            out = tmp_path / "out"
            refused_by_cli(capsys, ["sample", "--checkpoint", str(files["base"]), "--lora", str(target),
                                    "--steps", "2", "--per-digit", "1", "--out", str(out)], needle)
            assert not out.exists()
            refused_by_cli(capsys, ["info", str(target)], needle)


# ------------------------------------------------------------------ messages that say what was expected
def test_resize_and_export_peft_read_every_layout_sample_reads(files, tmp_path, capsys):
    for fmt in ("peft", "kohya", "diffusers"):
        out = tmp_path / f"r_{fmt}"
        assert main(["-q", "resize", "--lora", str(files[fmt]), "--rank", "1", "--out", str(out)]) == 0
        assert read_adapter(out).rank == 1
        peft = tmp_path / f"p_{fmt}"
        assert main(["-q", "export-peft", "--lora", str(files[fmt]), "--out", str(peft)]) == 0


def test_not_our_adapter_says_what_it_is_not_format_none(files):
    with pytest.raises(UserError) as e:
        read_adapter(files["kohya"])
    msg = one_line(e, str(files["kohya"]), "no 'format' entry", "sample --lora")
    assert "None" not in msg


def test_a_name_of_another_kind_says_what_it_is(capsys):
    refused_by_cli(capsys, ["train", "--conditioning", "text", "--vae", "pixel-base", "--out", "never"],
                   "pixel-base is a shipped model (for --checkpoint), not a VAE")
    refused_by_cli(capsys, ["sample", "--checkpoint", "bold", "--out", "never"],
                   "bold is a shipped adapter (for --lora), not a model")
    assert not Path("never").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("block_out_channels", ["a", "b"], "block_out_channels is ['a', 'b']; expected a non-empty list"),
    ("block_out_channels", 32, "expected a non-empty list of positive integers"),
    ("sample_size", [16, 8], "sample_size must be an integer"),
    ("sample_size", 7.5, "sample_size must be an integer, got 7.5"),
    ("norm_num_groups", "8", "norm_num_groups must be an integer"),
    ("dropout", [0.1], "dropout must be a number"),
    ("down_block_types", 3, "down_block_types is 3; expected a list of block class names"),
    ("attention_head_dim", 2.0, "attention_head_dim"),
])
def test_diffusers_unet_config_values_say_what_was_expected(key, value, needle):
    d = {**unet_config_to_diffusers(CFG), "class_embed_type": "simple_projection",
         "projection_class_embeddings_input_dim": CFG.context_dim, key: value}
    with pytest.raises(UserError) as e:
        unet_config_from_diffusers(d)
    msg = one_line(e, "unet/config.json", needle)
    assert "TypeError" not in msg and "not supported between" not in msg


# ------------------------------------------------------------------ a prompt model's parts and sizes
@pytest.fixture(scope="module")
def prompt_model(tmp_path_factory) -> Path:
    """A tiny prompt-conditioned latent model (random weights): UNet, text encoder, tokenizer/, vae/."""
    from lora4diffusion.models.text_encoder import TextEncoder, TextEncoderConfig
    from lora4diffusion.models.tokenizer import Tokenizer
    from lora4diffusion.models.vae import VAE, VAEConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4))
    tok = Tokenizer.load()
    te = TextEncoder(TextEncoderConfig.for_tokenizer(tok, width=32, layers=1, heads=2))
    unet = UNet(UNetConfig(image_size=vae.cfg.latent_size, in_channels=vae.cfg.latent_channels,
                           base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,),
                           context_dim=32, conditioning="text"))
    d = tmp_path_factory.mktemp("prompt") / "model"
    save_model(d, unet, DiffusionConfig(), vae=vae, text=(te, tok))
    return d


def with_config(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set(section: str, key: str, value):
    return lambda cfg: cfg[section].__setitem__(key, value)


@pytest.mark.parametrize("section,key,value,needle", [
    ("vae", "folder", "/etc", "vae.folder '/etc' is not a path inside"),
    ("vae", "folder", "../elsewhere/vae", "vae.folder '../elsewhere/vae' is not a path inside"),
    ("vae", "folder", "vae/../vae", "no '..'"),
    ("vae", "folder", "link", "leads outside"),
    ("tokenizer", "folder", "/usr/share", "tokenizer.folder '/usr/share' is not a path inside"),
    ("tokenizer", "folder", "../elsewhere/tokenizer", "tokenizer.folder"),
    ("text_encoder", "weights", "../elsewhere/text_encoder.safetensors", "text_encoder.weights"),
    ("text_encoder", "weights", "link/text_encoder.safetensors", "leads outside"),
    ("text_encoder", "weights", 5, "text_encoder.weights must be a path inside"),
])
def test_parts_of_a_model_are_read_only_from_inside_its_folder(prompt_model, tmp_path, capsys, section, key,
                                                              value, needle):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(prompt_model, elsewhere)  # a real, loadable model: before, it was followed
    bad = with_config(prompt_model, tmp_path / "bad", _set(section, key, value))
    os.symlink(elsewhere, bad / "link")  # a symbolic link inside the folder leading out of it
    with pytest.raises(UserError) as e:
        Pipeline.load(bad)
    one_line(e, str(bad / "config.json"), needle)
    refused_by_cli(capsys, ["sample", "--checkpoint", str(bad), "--steps", "2", "--per-digit", "1", "--out",
                            str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()
    row = next(r for r in listing([bad]) if r["path"] == str(bad))
    assert needle in row["problem"]


def test_a_link_inside_the_folder_to_its_own_part_is_fine(prompt_model, tmp_path):
    ok = with_config(prompt_model, tmp_path / "ok", _set("vae", "folder", "same"))
    os.symlink("vae", ok / "same")
    Pipeline.load(ok)


def test_a_unet_that_does_not_fit_its_vae_latents_is_refused_on_load(prompt_model, tmp_path, capsys):
    """image_size 16 over a VAE making 8 x 8 latents loads (conv weights do not depend on it) and used to
    sample noise with exit 0."""
    bad = with_config(prompt_model, tmp_path / "bad", _set("unet", "image_size", 16))
    needle = ("the UNet works on 4 x 16 x 16 inputs", "makes 4 x 8 x 8 latents")
    with pytest.raises(UserError) as e:
        Pipeline.load(bad)
    one_line(e, str(bad / "config.json"), *needle)
    refused_by_cli(capsys, ["sample", "--checkpoint", str(bad), "--steps", "2", "--per-digit", "1",
                            "--out", str(tmp_path / "out")], *needle)
    refused_by_cli(capsys, ["train-lora", "--checkpoint", str(bad), "--style", "bold", "--max-train-steps",
                            "1", "--out", str(tmp_path / "lora")], *needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "lora").exists()
    assert needle[0] in next(r for r in listing([bad]) if r["path"] == str(bad))["problem"]


@pytest.mark.parametrize("part,change,needle", [
    ("vae/config.json", lambda c: c["vae"].__setitem__("layers_per_block", 2**70), "layers_per_block"),
    ("vae/config.json", lambda c: c["vae"].__setitem__("block_out_channels", [8, 2**40]), "1..4096"),
    ("config.json", lambda c: c["text_encoder"]["config"].__setitem__("width", 2**40), "width must be <="),
    ("config.json", lambda c: c["text_encoder"]["config"].__setitem__("mlp_ratio", 2**40), "mlp_ratio must"),
    ("tokenizer/config.json", lambda c: c.__setitem__("context_length", DEEP), "not readable JSON"),
])
def test_a_part_asking_for_a_huge_network_is_refused_before_it_is_built(prompt_model, tmp_path, part, change,
                                                                         needle):
    """The VAE and text encoder of a model folder had no upper bounds: 2**70 ResNet blocks were built until
    memory ran out (found by tests/test_fuzz.py); a deep tokenizer config was a RecursionError."""
    bad = tmp_path / "bad"
    shutil.copytree(prompt_model, bad)
    if part.endswith("tokenizer/config.json"):
        (bad / part).write_text('{"context_length": ' + DEEP + "}")
    else:
        cfg = json.loads((bad / part).read_text())
        change(cfg)
        (bad / part).write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        Pipeline.load(bad)
    one_line(e, needle)


# ------------------------------------------------------------------ list and info
@pytest.fixture
def open_dir():
    """A folder everyone may enter (pytest's tmp folders are 0700: a dropped-privilege child could not even
    look inside)."""
    d = Path(tempfile.mkdtemp(prefix="l4d-list-"))
    os.chmod(d, 0o755)
    yield d
    for p in d.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755)
    shutil.rmtree(d, ignore_errors=True)


def mixed_folder(files: dict[str, Path], root: Path) -> dict[str, str]:
    """A folder of good and damaged items: {name: "ok" or the words its problem row must hold}."""
    shutil.copytree(files["base"], root / "good_model")
    deep = shutil.copytree(files["base"], root / "deep_model")
    (deep / "config.json").write_text(DEEP)  # RecursionError crashed the whole listing
    shutil.copytree(files["ours"], root / "good_adapter")
    shutil.copytree(files["peft"], root / "good_peft")
    shutil.copy(files["kohya"], root / "good_kohya.safetensors")
    rewrite(files["kohya"], root / "bad_alpha" / "x.safetensors",
            {_alpha_key(files["kohya"]): torch.tensor([1.0, 2.0])})
    (root / "truncated.safetensors").write_bytes(files["kohya"].read_bytes()[:100])
    (root / "notes.txt").write_text("not a model")  # ignored in a folder listing
    return {"good_model": "ok", "good_adapter": "ok", "good_peft": "ok", "good_kohya.safetensors": "ok",
            "deep_model": "not readable JSON", "bad_alpha": "must hold one number",
            "truncated.safetensors": "corrupt or truncated"}


def check_rows(rows: list[dict], root: Path, want: dict[str, str]) -> None:
    mine = {Path(r["path"]).name: r for r in rows if Path(r["path"]).parent == root}
    assert set(mine) == set(want), (sorted(mine), sorted(want))
    for name, what in want.items():
        if what == "ok":
            assert "problem" not in mine[name], mine[name]
        else:
            assert what in mine[name]["problem"] and "\n" not in mine[name]["problem"], mine[name]


def test_list_shows_what_it_can_and_marks_what_it_cannot_read(files, tmp_path, capsys):
    want = mixed_folder(files, tmp_path)
    check_rows(listing([tmp_path]), tmp_path, want)
    capsys.readouterr()
    assert main(["list", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "not readable" in out and "good_model" in out and "good_kohya.safetensors" in out
    assert err.strip().splitlines() == [
        "lora4diffusion list: 3 item(s) could not be read (marked 'problem' / 'not readable')"]
    assert main(["list", "--json", str(tmp_path)]) == 0
    check_rows(json.loads(capsys.readouterr().out), tmp_path, want)
    for name, what in want.items():  # info reads the whole item: the damaged ones are one line, exit 2
        if what == "ok":
            assert main(["info", str(tmp_path / name)]) == 0
        else:
            refused_by_cli(capsys, ["info", str(tmp_path / name)], what)


def test_list_file_describes_that_file(files, tmp_path, capsys):
    """`list FILE` used to ignore the argument unless it was an adapter file."""
    rows = listing([files["kohya"]])
    assert rows[-1]["path"] == str(files["kohya"]) and rows[-1]["format"] == "kohya" and rows[-1]["rank"] == 2
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert "not a model, VAE or adapter" in listing([notes])[-1]["problem"]
    alone = listing([files["base"]])[-1]  # an item is listed itself, not what lies inside it
    assert alone["path"] == str(files["base"]) and alone["kind"] == "model" and "problem" not in alone
    assert alone in listing([files["base"].parent])
    refused_by_cli(capsys, ["list", str(tmp_path / "missing")], "does not exist")


def _in_child_as_nobody(fn) -> str:
    """``fn()``'s result as JSON text, run in a forked child as uid/gid 65534 where this test runs as root
    (root reads mode-000 files); directly otherwise. What else happened, as text."""
    def run() -> str:
        try:
            return json.dumps(fn())
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            return f"{type(e).__name__}: {e}"

    if os.geteuid() != 0:
        return run()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.setgid(65534)
        os.setuid(65534)
        os.write(w, run().encode())
        sys.stdout.flush()
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def test_list_goes_on_past_unreadable_files_and_folders(files, open_dir):
    """A folder that may not be entered, an adapter and a config that may not be read: PermissionError
    stopped the whole `list` before."""
    root = open_dir
    shutil.copytree(files["base"], root / "good_model")
    shutil.copytree(files["base"], root / "closed_model")
    shutil.copytree(files["base"], root / "locked_config")
    shutil.copy(files["kohya"], root / "locked.safetensors")
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(root / "closed_model", 0o000)
    os.chmod(root / "locked_config" / "config.json", 0o000)
    os.chmod(root / "locked.safetensors", 0o000)
    text = _in_child_as_nobody(lambda: listing([root]))
    rows = json.loads(text)  # a traceback's text is not JSON: it fails here, showing it
    check_rows(rows, root, {"good_model": "ok", "closed_model": "permission denied",
                            "locked_config": "permission denied", "locked.safetensors": "permission denied"})
