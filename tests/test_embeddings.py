"""Textual inversion and pivotal tuning: a new token learned as an embedding (training/embedding.py,
lora/embeddings.py), its files (formats/embeddings.py), and against transformers' CLIPTokenizer +
CLIPTextModel and diffusers' load_textual_inversion (test oracles, offline).

One tiny prompt model per session (conftest.py); the embeddings here train for a few steps only: what is
checked is which numbers move and which do not, and that other tools compute the same thing.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora4diffusion.cli import main
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import load_model
from lora4diffusion.folders.text import load_text_parts
from lora4diffusion.formats import read_any, write_lora
from lora4diffusion.formats.embeddings import read_any_embedding, write_embedding
from lora4diffusion.formats.transformers_clip import export_text_encoder
from lora4diffusion.inventory import info, listing
from lora4diffusion.lora.embeddings import read_embedding
from lora4diffusion.lora.prompt_lora import prompt_fingerprint
from lora4diffusion.models.prompt_unet import TextConditionedUNet
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.embedding import new_token, train_embedding
from lora4diffusion.training.lora import LoRAConfig, TriggerTask, train_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "<bold-ti>"
LORA = LoRAConfig(rank=2, alpha=2.0)
SMALL = {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "per_digit": 2, "progress": False,
         "device": "cpu", "bf16": False}


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def embedding(tiny_prompt_model, tmp_path_factory):
    """(run folder, base digest before, base digest after) of a 2-vector textual inversion, 6 steps."""
    out = tmp_path_factory.mktemp("ti") / "ti"
    before = _digest(tiny_prompt_model)
    r = train_embedding("bold", out, TOKEN, base=tiny_prompt_model, init_word="bold", num_vectors=2, **SMALL)
    assert r["step"] == 6 and r["trainable_params"] == 2 * 32  # two vectors of the tiny encoder's width
    return out, before, _digest(tiny_prompt_model)


def test_training_moves_only_the_new_rows(tiny_prompt_model):
    """The loss's gradient reaches the token's vectors and nothing else: every base parameter, the token
    embedding's rows included, is frozen (no gradient at all), although the captions use base words."""
    unet, _, cfg = load_model(tiny_prompt_model)
    te, tok = load_text_parts(tiny_prompt_model, cfg)
    model = TextConditionedUNet(unet, te)
    for p in model.parameters():
        p.requires_grad_(False)
    vec = new_token(te, tok, TOKEN, 2, "bold")
    assert torch.equal(vec[0], te.token_embedding.weight[tok.words.index("bold")])  # from the init word
    ids = tok.encode([f"a handwritten {TOKEN} seven", "the digit 7 in bold style"])
    x = torch.randn(2, unet.cfg.in_channels, unet.cfg.image_size, unet.cfg.image_size)
    loss = (model(x, torch.tensor([100, 700]), ids) - x).pow(2).mean()
    loss.backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["text_encoder.added_tokens.0"]
    assert all(p.grad is None for p in model.parameters() if p is not vec)  # base rows included
    # the base's rows are read, not copied: the same values as the frozen embedding, bit for bit
    assert torch.equal(te.embed_tokens(ids[1:]), te.token_embedding(ids[1:]))


def test_train_embedding_leaves_the_base_bit_identical(embedding, tiny_prompt_model):
    out, before, after = embedding
    assert before == after  # the base folder's files, byte for byte
    emb = read_embedding(out)
    assert emb.token == TOKEN and emb.vectors.shape == (2, 32) and emb.init_word == "bold"
    unet, _, cfg = load_model(tiny_prompt_model)
    te, tok = load_text_parts(tiny_prompt_model, cfg)
    assert emb.fingerprint == prompt_fingerprint(unet, te)
    start = te.token_embedding.weight[tok.words.index("bold")]
    assert not torch.equal(emb.vectors[0], start)  # it trained
    for key in ("style", "steps", "train", "base"):
        assert key in emb.extra


def test_prompts_without_the_token_are_the_base_bit_for_bit(embedding, tiny_prompt_model):
    base = Pipeline.load(tiny_prompt_model)
    with_emb = Pipeline.load(tiny_prompt_model)
    assert with_emb.add_embedding(embedding[0]) == TOKEN
    prompts = ["a handwritten seven", "the digit 3"]
    a, _ = base.generate(prompts, steps=3, seed=1)
    b, _ = with_emb.generate(prompts, steps=3, seed=1)
    assert torch.equal(a, b)
    c, _ = with_emb.generate([f"a handwritten {TOKEN} seven", f"the digit {TOKEN} 3"], steps=3, seed=1)
    assert (c - a).abs().max() > 1e-4  # the token does something
    assert with_emb.fingerprint == base.fingerprint  # adapters still fit: the base is unchanged


def test_transformers_clip_with_the_added_token_gives_our_ids_and_context(embedding, tiny_prompt_model,
                                                                          tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = Pipeline.load(tiny_prompt_model)
    pipe.add_embedding(embedding[0])
    emb = read_embedding(embedding[0])
    export_text_encoder(pipe.text_encoder, pipe.tokenizer, tmp_path)  # the base's parts only
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    te = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    names = [TOKEN, f"{TOKEN}_1"]  # diffusers' names for a 2-vector token (load_textual_inversion)
    tok.add_tokens(names)
    te.resize_token_embeddings(len(tok))
    new = tok.convert_tokens_to_ids(names)
    with torch.no_grad():
        te.get_input_embeddings().weight[new] = emb.vectors
    ours = [f"a handwritten {TOKEN} seven", "the digit 3", f"{TOKEN} 5"]
    theirs_text = [p.replace(TOKEN, " ".join(names)) for p in ours]  # diffusers' maybe_convert_prompt
    ids = tok(theirs_text, padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.tokenizer.encode(ours))
    with torch.no_grad():
        diff = (te(ids).last_hidden_state - pipe.text_encoder(ids)[0]).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_diffusers_load_textual_inversion_draws_our_images(embedding, tiny_prompt_model, tmp_path, fmt):
    """Our exported pipeline + load_textual_inversion(our file) = our `sample --embedding`, same latents."""
    from diffusers import StableDiffusionPipeline

    from lora4diffusion.models.vae import crop_to

    sd_dir = tmp_path / "sd"
    assert main(["-q", "export-diffusers", "--checkpoint", str(tiny_prompt_model), "--out", str(sd_dir)]) == 0
    emb = read_embedding(embedding[0])
    file = write_embedding(emb, fmt, tmp_path / fmt)
    sd = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None,
                                                 requires_safety_checker=False).to(torch.float32)
    sd.load_textual_inversion(str(file), token=TOKEN)
    prompts = [f"a handwritten {TOKEN} seven", f"the digit {TOKEN} 2"]
    out = tmp_path / "s"
    argv = ["-q", "sample", "--checkpoint", str(tiny_prompt_model), "--embedding", str(file), "--prompt",
            prompts[0], "--prompt", prompts[1], "--num", "1", "--steps", "4", "--guidance", "2", "--seed",
            "5", "--no-bf16", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    mine = torch.from_numpy(np.load(out / "samples.npz")["images"])
    assert main(["-q", "sample", "--from", str(out / "samples.png"), "--out", str(tmp_path / "again")]) == 0
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "again" / "samples.npz")["images"]), mine)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5 * 1_000_003))
    images = sd(prompts, num_inference_steps=4, guidance_scale=2.0, latents=latents, output_type="pt").images
    theirs = crop_to(images, 28, 28)[:, 0]
    assert (theirs - mine).abs().max().item() <= 1e-5
    plain = sd([p.replace(f"{TOKEN} ", "") for p in prompts], num_inference_steps=4, guidance_scale=2.0,
               latents=latents, output_type="pt").images
    assert (crop_to(plain, 28, 28)[:, 0] - mine).abs().max() > 1e-3  # the comparison can fail


def test_files_round_trip_and_detection(embedding, tmp_path):
    emb = read_embedding(embedding[0])
    for fmt in ("diffusers", "a1111"):
        back = read_any_embedding(write_embedding(emb, fmt, tmp_path / fmt))
        assert back.token == emb.token and torch.equal(back.vectors, emb.vectors)
        assert (back.fingerprint, back.init_word, back.extra) == (emb.fingerprint, emb.init_word, emb.extra)
    with safe_open(str(tmp_path / "a1111" / "bold-ti.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["name"] == "bold-ti"
    with safe_open(str(tmp_path / "diffusers" / "learned_embeds.safetensors"), "pt") as f:
        assert list(f.keys()) == [TOKEN]
    # files written by the other tools themselves (no metadata of ours): the token from the key / file name
    save_file({"<cat-toy>": torch.randn(32)}, str(tmp_path / "learned_embeds.safetensors"))
    cat = read_any_embedding(tmp_path / "learned_embeds.safetensors")
    assert cat.token == "<cat-toy>" and cat.vectors.shape == (1, 32) and cat.fingerprint == "unknown"
    save_file({"emb_params": torch.randn(3, 32)}, str(tmp_path / "my_style.safetensors"))
    assert read_any_embedding(tmp_path / "my_style.safetensors").token == "<my_style>"
    assert read_any_embedding(tmp_path / "my_style.safetensors", token="<x>").token == "<x>"
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserError, match="SDXL"):
        read_any_embedding(tmp_path / "xl.safetensors")
    (tmp_path / "e.pt").write_bytes(b"not read")
    with pytest.raises(UserError, match="only .safetensors"):
        read_any_embedding(tmp_path / "e.pt")


def test_cli_refuses_an_unknown_token_in_one_line(embedding, tiny_prompt_model, tmp_path, capsys):
    argv = ["sample", "--checkpoint", str(tiny_prompt_model), "--prompt", f"a {TOKEN} seven", "--out",
            str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown token '{TOKEN}'" in err and "--embedding" in err
    assert main([*argv[:-2], "--embedding", str(embedding[0]), "--prompt", "a <bold-tx> seven", "--out",
                 str(tmp_path / "t")]) == 2
    assert "nearest: <bold-ti>" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    bad = ["train-embedding", "--checkpoint", str(tiny_prompt_model), "--style", "bold", "--out",
           str(tmp_path / "u")]
    assert main([*bad, "--token", "boldti"]) == 2  # not written <name>
    assert main([*bad, "--token", TOKEN, "--init-word", "bolder"]) == 2
    assert "not a word" in capsys.readouterr().err and not (tmp_path / "u").exists()


def test_list_and_info_show_embeddings(embedding, tiny_prompt_model, tmp_path):
    write_embedding(read_embedding(embedding[0]), "a1111", tmp_path)
    rows = {r["name"]: r for r in listing([embedding[0], tmp_path / "bold-ti.safetensors"])}
    ours, theirs = rows[str(embedding[0])], rows[str(tmp_path / "bold-ti.safetensors")]
    assert ours["kind"] == theirs["kind"] == "embedding" and "problem" not in ours
    assert (ours["token"], ours["vectors"], theirs["format"]) == (TOKEN, 2, "a1111")
    facts = info(embedding[0], checkpoint=str(tiny_prompt_model))
    assert facts["token"] == TOKEN and facts["init_word"] == "bold" and facts["fits"].startswith("yes")


def test_pivotal_tuning_bundles_the_token_and_a_tag_brings_it(tiny_prompt_model, tmp_path):
    out = tmp_path / "piv"
    r = train_lora("bold", out, base=tiny_prompt_model, lora=LORA, text_encoder=True, prior=True,
                   pivotal={"token": "<bold-pt>", "num_vectors": 1, "init_word": "bold"}, **SMALL)
    assert r["embedding_params"] == 32
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        bundled = [k for k in f.keys() if k.startswith("bundle_emb.")]
    assert bundled == ["bundle_emb.<bold-pt>.string_to_param.*"]  # A1111's bundled-embedding layout
    adapter = read_any(out)
    kohya = read_any(write_lora(adapter, "kohya", tmp_path / "k"))
    assert torch.equal(kohya.embeddings["<bold-pt>"], adapter.embeddings["<bold-pt>"])
    with pytest.raises(UserError, match="kohya"):  # not dropped silently by a layout that cannot hold it
        write_lora(adapter, "peft", tmp_path / "p")
    pipe = Pipeline.load(tiny_prompt_model)
    with pytest.raises(UserError, match="unknown token"):
        pipe.generate(["a <bold-pt> seven"], steps=2)
    tagged, _ = pipe.generate([f"<lora:{out}:1> a <bold-pt> seven"], steps=2, seed=3)  # the tag brings it
    assert "<bold-pt>" in pipe.tokenizer.added
    other = Pipeline.load(tiny_prompt_model)
    other.add_lora(tmp_path / "k" / "adapter.safetensors")
    assert torch.equal(other.generate(["a <bold-pt> seven"], steps=2, seed=3)[0], tagged)
    # resume records the token: a changed one is refused
    with pytest.raises(UserError, match="pivotal"):
        train_lora("bold", out, base=tiny_prompt_model, lora=LORA, text_encoder=True, prior=True, resume=True,
                   pivotal={"token": "<bold-px>"}, **{**SMALL, "steps": 8})


def test_trainer_embedding_parameter_only(embedding):
    """The run's train state holds the token's vectors only (its EMA and optimizer moments too)."""
    with safe_open(str(embedding[0] / "train_state.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("added_tokens.0" in k for k in keys)


def test_captions_place_the_token_where_a_trigger_goes(tiny_prompt_model):
    _, _, cfg = load_model(tiny_prompt_model)
    te, tok = load_text_parts(tiny_prompt_model, cfg)
    new_token(te, tok, TOKEN, 1, None)
    task = TriggerTask(None, tok, TOKEN)
    assert any(f"{TOKEN} seven" in c for c in task.row) and any(f"in {TOKEN} style" in c for c in task.row)


def test_embeddings_folder_is_found_by_name_as_automatic1111(embedding, tiny_prompt_model, tmp_path,
                                                              monkeypatch, capsys):
    """A file in ./embeddings goes by its name: `<name>` in a prompt loads it (no --embedding), as do
    --embedding NAME and --embedding <NAME>; `list` and `info` show it under that token."""
    emb = read_embedding(embedding[0])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embeddings").mkdir()
    theirs = write_embedding(emb, "a1111", tmp_path / "embeddings")  # bold-ti.safetensors
    theirs.rename(tmp_path / "embeddings" / "my-ink.safetensors")  # its own token stays <bold-ti>
    common = ["-q", "sample", "--checkpoint", str(tiny_prompt_model), "--num", "2", "--steps", "3", "--seed",
              "2", "--no-bf16", "--device", "cpu"]
    assert main([*common, "--prompt", "a <my-ink> seven", "--out", "byname"]) == 0
    assert main([*common, "--embedding", str(embedding[0]), "--prompt", f"a {TOKEN} seven", "--out",
                 "bypath"]) == 0
    got, want = (np.load(tmp_path / d / "samples.npz")["images"] for d in ("byname", "bypath"))
    assert np.array_equal(got, want)
    assert main([*common, "--prompt", "a <my-inc> seven", "--out", "typo"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "nearest: <my-ink>" in err and not (tmp_path / "typo").exists()
    pipe = Pipeline.load(tiny_prompt_model)
    assert pipe.add_embedding("my-ink") == "<my-ink>" and pipe.add_embedding("<my-ink>") == "<my-ink>"
    with pytest.raises(UserError, match="did you mean my-ink"):
        pipe.add_embedding("my-inc")
    rows = {r["name"]: r for r in listing()}
    assert rows["my-ink"]["kind"] == "embedding" and rows["my-ink"]["token"] == "<my-ink>"
    assert info("my-ink")["token"] == "<my-ink>"
    # an adapters folder (serve --adapters DIR) lists its embeddings/ too
    (tmp_path / "adapters" / "embeddings").mkdir(parents=True)
    write_embedding(emb, "diffusers", tmp_path / "adapters" / "embeddings").rename(
        tmp_path / "adapters" / "embeddings" / "sharp.safetensors")  # the folder's only file: listed once
    rows = [r for r in listing([tmp_path / "adapters"]) if str(tmp_path / "adapters") in r["path"]]
    assert [(r["name"], r["token"]) for r in rows] == [
        (str(tmp_path / "adapters" / "embeddings" / "sharp.safetensors"), "<sharp>")]


def test_merge_of_a_pivotal_adapter_ships_its_token(tiny_prompt_model, random_prompt_lora, tmp_path):
    """merge writes the token's vectors beside the merged model (embeddings/piv.safetensors, named in
    config.json) and leaves the base's file layout as it was; the merged model with the token in the prompt
    draws what the base + the unmerged pivotal adapter draws (fp32, to rounding)."""
    import dataclasses
    import json

    from lora4diffusion.checkpoint import tensor_header

    adapter, fingerprint = random_prompt_lora(tiny_prompt_model, 0.3)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    pivotal = dataclasses.replace(adapter, fingerprint=fingerprint, embeddings={"<piv>": vectors})
    pivotal.save(tmp_path / "piv")
    merged = tmp_path / "merged"
    assert main(["-q", "merge", "--checkpoint", str(tiny_prompt_model), "--lora", str(tmp_path / "piv"),
                 "--out", str(merged), "--device", "cpu"]) == 0
    assert json.loads((merged / "config.json").read_text())["embeddings"] == ["embeddings/piv.safetensors"]
    for part in ("model.safetensors", "text_encoder.safetensors"):  # the same tensors, names and shapes
        assert tensor_header(merged / part) == tensor_header(tiny_prompt_model / part)
    assert (merged / "tokenizer" / "vocab.txt").read_bytes() == \
        (tiny_prompt_model / "tokenizer" / "vocab.txt").read_bytes()
    prompts = ["a <piv> seven", "the digit <piv> 3", "a handwritten 5"]
    base = Pipeline.load(tiny_prompt_model)
    base.add_lora(tmp_path / "piv")
    want, _ = base.generate(prompts, steps=4, seed=2)
    mine = Pipeline.load(merged)
    assert mine.tokenizer.added == {"<piv>": base.tokenizer.added["<piv>"]}
    got, _ = mine.generate(prompts, steps=4, seed=2)
    assert (got - want).abs().max().item() <= 1e-5
    plain, _ = Pipeline.load(tiny_prompt_model).generate([p.replace("<piv> ", "") for p in prompts], steps=4,
                                                          seed=2)
    assert (plain - want).abs().max().item() > 1e-3  # the comparison can fail
    emb = read_embedding(merged / "embeddings" / "piv.safetensors")
    assert torch.equal(emb.vectors, vectors) and emb.fingerprint == mine.fingerprint
    row = next(r for r in listing([merged]) if r["path"] == str(merged))
    assert row["tokens"] == "<piv>" and "problem" not in row

    # export-diffusers writes the token as diffusers' learned_embeds file: load_textual_inversion draws ours
    from diffusers import StableDiffusionPipeline

    from lora4diffusion.models.vae import crop_to

    sd_dir, back = tmp_path / "sd", tmp_path / "back"
    assert main(["-q", "export-diffusers", "--checkpoint", str(merged), "--out", str(sd_dir)]) == 0
    sd = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None,
                                                 requires_safety_checker=False).to(torch.float32)
    sd.load_textual_inversion(str(sd_dir / "embeddings" / "piv.safetensors"))  # the token is the file's key
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2 * 1_000_003))
    theirs = sd(prompts, num_inference_steps=4, guidance_scale=2.0, latents=latents, output_type="pt").images
    ours, _ = mine.generate(prompts, steps=4, seed=2, guidance=2.0)
    assert (crop_to(theirs, 28, 28)[:, 0] - ours).abs().max().item() <= 1e-5
    assert main(["-q", "import-diffusers", str(sd_dir), "--out", str(back)]) == 0  # and back, token included
    assert torch.equal(Pipeline.load(back).generate(prompts, steps=4, seed=2, guidance=2.0)[0], ours)


def test_pivotal_embedding_lr_is_its_own_recorded_and_resumable(tiny_prompt_model, tmp_path, capsys):
    """--embedding-lr sets the token's rate apart from the LoRA's (AdamW moves a parameter about lr per step):
    at 1e-9 the vector stays at its init word's row; the rate is recorded in the adapter and the run, and a
    resume with another one is refused unless --allow-changes, then the vector moves."""
    out = tmp_path / "piv"
    argv = ["-q", "train-lora", "--checkpoint", str(tiny_prompt_model), "--style", "bold", "--pivotal",
            "--token", "<slow>", "--init-word", "bold", "--rank", "2", "--batch-size", "8",
            "--examples-per-digit", "2", "--device", "cpu", "--no-bf16", "--out", str(out)]
    assert main([*argv, "--embedding-lr", "1e-9", "--max-train-steps", "3"]) == 0
    _, _, cfg = load_model(tiny_prompt_model)
    te, tok = load_text_parts(tiny_prompt_model, cfg)
    start = te.token_embedding.weight[tok.words.index("bold")].detach()
    adapter = read_any(out)
    assert (adapter.embeddings["<slow>"][0] - start).abs().max() < 1e-7
    assert adapter.extra["embedding_lr"] == "1e-09"
    assert any(v != 0 for t in adapter.tensors.values() for v in t.flatten().tolist())  # the LoRA trained
    again = [*argv, "--embedding-lr", "1e-3", "--max-train-steps", "4", "--resume"]
    assert main(again) == 2 and "pivotal" in capsys.readouterr().err
    assert main([*again, "--allow-changes"]) == 0
    moved = read_any(out).embeddings["<slow>"][0]
    assert (moved - start).abs().max() > 1e-4 and read_any(out).extra["embedding_lr"] == "0.001"
    plain = ["-q", "train-lora", "--checkpoint", str(tiny_prompt_model), "--style", "bold"]
    assert main([*plain, "--embedding-lr", "1e-3", "--out", str(tmp_path / "x")]) == 2  # needs --pivotal
    assert "go with --pivotal" in capsys.readouterr().err
