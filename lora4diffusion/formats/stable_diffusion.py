"""A prompt model <-> a diffusers ``StableDiffusionPipeline`` folder (export and import).

Our prompt model folder (folders/model.py) and the diffusers folder hold the same five parts:

    ours                                    diffusers folder (model_index.json: StableDiffusionPipeline)
    config.json "unet" + model.safetensors  unet/config.json + diffusion_pytorch_model.safetensors
                                              (UNet2DConditionModel, class_embed_type None: SD 1.x)
    text_encoder.safetensors + "text_encoder" text_encoder/config.json + model.safetensors (CLIPTextModel)
    tokenizer/ (vocab.txt, config.json)      tokenizer/ (vocab.json, merges.txt, ...: CLIPTokenizer)
    vae/ (config.json, model.safetensors)    vae/config.json + diffusion_pytorch_model.safetensors
                                              (AutoencoderKL, with our measured scaling_factor)
    config.json "diffusion"                  scheduler/scheduler_config.json (DDIMScheduler)
    embeddings/NAME.safetensors (tokens)    embeddings/NAME.safetensors ({token: [n, D]}, diffusers'
                                              learned_embeds layout, one token a file: what
                                              ``pipe.load_textual_inversion(file)`` reads)

What makes the pipeline compute what ``Pipeline.generate`` computes, step for step (tests/test_export_sd.py):
- prompt -> ids: CLIPTokenizer padded to model_max_length (16) with eos = our [bos, words, eos, eos...];
- ids -> context: CLIPTextModel's last hidden state (after final_layer_norm), no attention mask (SD passes
  none unless ``use_attention_mask``; both are causal), no pooled output used: our text-mode UNet adds
  nothing to the timestep embedding, as SD 1.x;
- guidance: eps_u + w (eps_c - eps_u) with the negative prompt (or "") as eps_u, as ours; diffusers skips
  guidance for w <= 1 (w = 1 is the same; w < 1 is not);
- scheduler: DDIM, our betas, "leading" timesteps with steps_offset 1 (StableDiffusionPipeline rewrites any
  other offset to 1 on load, so our prompt models sample with 1: diffusion.STEPS_OFFSET), no clipping of
  the latents (the pipeline also forces clip_sample False), set_alpha_to_one;
- latents -> image: vae.decode(z / scaling_factor), then (x / 2 + 0.5).clamp(0, 1): the pipeline returns
  the VAE's whole 32 x 32 canvas; our digits are its centred 28 x 28 (models/vae.py crop_to).

No safety checker, feature extractor or image encoder (``[null, null]`` in model_index.json). Pure file and
name conversion: diffusers and transformers are never imported here.
"""

from __future__ import annotations

from pathlib import Path

from lora4diffusion.catalog import EMBEDDINGS_FOLDER
from lora4diffusion.checkpoint import atomic_write, load_tensors, read_json, save_tensors, write_json
from lora4diffusion.diffusion import DiffusionConfig
from lora4diffusion.errors import UserError
from lora4diffusion.folders.model import save_model
from lora4diffusion.formats import diffusers_vae
from lora4diffusion.formats.diffusers_unet import (
    DIFFUSERS_VERSION,
    SCHEDULER_CONFIG,
    SCHEDULER_DIR,
    UNET_CONFIG,
    UNET_DIR,
    UNET_WEIGHTS,
    diffusion_from_scheduler,
    load_unet_weights,
    scheduler_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_state_to_diffusers,
)
from lora4diffusion.formats.embeddings import read_any_embedding
from lora4diffusion.formats.transformers_clip import (
    config_from_transformers,
    export_text_encoder,
    from_transformers,
)
from lora4diffusion.lora.embeddings import add_token
from lora4diffusion.models.text_encoder import TextEncoder
from lora4diffusion.models.tokenizer import Tokenizer
from lora4diffusion.models.unet import UNet
from lora4diffusion.models.vae import VAE

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "StableDiffusionPipeline"
VAE_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = "vae", "text_encoder", "tokenizer"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "model.safetensors"
_COMPONENTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}
# Accepted on import: what diffusers and transformers write for these parts (fast tokenizers save their class
# name; a folder trained further may keep a DDPM noise scheduler: only its betas are read).
_ACCEPTED = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "scheduler": {"DDIMScheduler", "DDPMScheduler"},
}


def model_index() -> dict:
    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        **_COMPONENTS,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


_README = """# {name}: a lora4diffusion prompt model as a diffusers Stable Diffusion pipeline

Exported by `lora4diffusion export-diffusers` from `{source}`: SD 1.x's design at MNIST scale (UNet with
cross-attention to a CLIP-style text encoder, KL autoencoder with {ch}x{lat}x{lat} latents, 28x28 digits on a
{size}x{size} canvas). Trained from scratch on captions like "the digit 7"; words outside its {words}-word
vocabulary are unknown to the tokenizer (CLIPTokenizer maps them to pieces the text encoder never saw).

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{name}", safety_checker=None, requires_safety_checker=False)
out = pipe(["the digit 7", "a bold digit three"], num_inference_steps=10, guidance_scale=1.25,
           generator=torch.Generator().manual_seed(0), output_type="pt")
digits = out.images[:, 0, 2:30, 2:30]            # [B, 28, 28] in [0, 1]: the centre of the canvas
```

`lora4diffusion sample --checkpoint MODEL --prompt ... --seed S` draws the initial latents of its first
50 images as `generator=torch.Generator().manual_seed(S * 1_000_003)` does here (seed 0: `manual_seed(0)`),
so the same prompts, negative prompt, steps and guidance (> 1, or exactly 1) give the same digits to ~1e-6
(docs/INTEROP.md in the lora4diffusion repository); or pass any `latents=`. `lora4diffusion import-diffusers
DIR --out MODEL` converts this folder back.
"""


def export_sd_pipeline(
    unet: UNet,
    diffusion: DiffusionConfig,
    vae: VAE,
    text_encoder: TextEncoder,
    tokenizer: Tokenizer,
    out: str | Path,
    source: str = "",
) -> list[Path]:
    """Write the ``StableDiffusionPipeline`` folder of a prompt model into ``out``; returns the files."""
    out = Path(out)
    if unet.cfg.conditioning != "text":
        raise UserError("a StableDiffusionPipeline export needs a prompt model (conditioning 'text')")
    if vae is None or text_encoder is None or tokenizer is None:
        raise UserError("a prompt model is exported with its VAE, text encoder and tokenizer")
    if unet.cfg.in_channels != vae.cfg.latent_channels or unet.cfg.image_size != vae.cfg.latent_size:
        raise UserError("the UNet does not denoise this VAE's latents (channels or size differ)")
    unet_weights = {k: v.float() for k, v in unet_state_to_diffusers(unet).items()}
    save_tensors(out / UNET_DIR / UNET_WEIGHTS, unet_weights, {"format": "pt"})
    write_json(out / UNET_DIR / UNET_CONFIG, unet_config_to_diffusers(unet.cfg))
    vae_weights = {k: v.float() for k, v in diffusers_vae.to_diffusers(vae.state_dict()).items()}
    save_tensors(out / VAE_DIR / VAE_WEIGHTS, vae_weights, {"format": "pt"})
    write_json(out / VAE_DIR / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        **diffusers_vae.diffusers_config(vae.cfg),
    })
    export_text_encoder(text_encoder, tokenizer, out)  # text_encoder/ and tokenizer/
    for token in text_encoder.added_tokens.tokens:  # a merged pivotal model's tokens, as diffusers loads them
        vectors = text_encoder.added_tokens.vector(token).detach().float().cpu().contiguous()
        file = out / EMBEDDINGS_FOLDER / f"{token[1:-1]}.safetensors"
        save_tensors(file, {token: vectors}, {"format": "pt"})
    write_json(out / SCHEDULER_DIR / SCHEDULER_CONFIG, scheduler_config(diffusion, prompt_model=True))
    write_json(out / MODEL_INDEX, model_index())
    text = _README.format(
        name=out.name or str(out), source=source or "a lora4diffusion prompt model",
        ch=vae.cfg.latent_channels, lat=vae.cfg.latent_size, size=vae.cfg.image_size,
        words=len(tokenizer.words),
    )
    atomic_write(out / "README.md", lambda p: p.write_text(text))
    return sorted(p for p in out.rglob("*") if p.is_file())


def is_sd_pipeline(folder: str | Path) -> bool:
    """True when ``folder`` has a model_index.json (a diffusers pipeline folder, of any class)."""
    return (Path(folder) / MODEL_INDEX).is_file()


def _weights(folder: Path, part: str, name: str) -> Path:
    path = folder / part / name
    if not path.is_file():
        others = sorted(p.name for p in (folder / part).glob("*") if p.suffix in (".bin", ".safetensors"))
        why = f" (found {', '.join(others)}: pickled or sharded weights are not read)" if others else ""
        raise UserError(f"{folder}: no {part}/{name}{why}")
    return path


def _scheduler(folder: Path) -> DiffusionConfig:
    d = read_json(folder / SCHEDULER_DIR / SCHEDULER_CONFIG)
    where = f"{SCHEDULER_DIR}/{SCHEDULER_CONFIG}"
    # Our prompt models sample with "leading" timesteps, steps_offset 1 (StableDiffusionPipeline sets 1
    # whatever the file says) and the last step to abar = 1; clip_sample is forced off by the pipeline.
    if d.get("timestep_spacing", "leading") != "leading":
        raise UserError(f"{where}: timestep_spacing {d['timestep_spacing']!r} is not supported"
                        " (ours: 'leading')")
    if d.get("_class_name") == "DDIMScheduler" and d.get("set_alpha_to_one", True) is not True:
        raise UserError(f"{where}: set_alpha_to_one {d['set_alpha_to_one']!r} is not supported (ours: true)")
    return diffusion_from_scheduler(d)


def read_sd_pipeline(folder: str | Path) -> tuple[UNet, DiffusionConfig, VAE, TextEncoder, Tokenizer]:
    """``_read_sd_pipeline``; a config value of the wrong type anywhere in the folder (a list or an object
    where a name or a number belongs: JSON from another tool) is one line naming the folder."""
    try:
        return _read_sd_pipeline(folder)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"{folder}: malformed diffusers config value ({type(e).__name__}: {e})") from None


def _read_sd_pipeline(folder: str | Path) -> tuple[UNet, DiffusionConfig, VAE, TextEncoder, Tokenizer]:
    """The parts of a ``StableDiffusionPipeline`` folder of ``export_sd_pipeline``'s shape (also one trained
    further or re-saved by diffusers' own scripts); a part our modules cannot compute is a one-line
    UserError that names it (``unet/config.json: ...``, ``vae/...``, ``text_encoder/...``, ...)."""
    folder = Path(folder)
    index = read_json(folder / MODEL_INDEX)
    if index.get("_class_name") != PIPELINE_CLASS:
        raise UserError(f"{folder / MODEL_INDEX}: _class_name {index.get('_class_name')!r} is not"
                        f" {PIPELINE_CLASS}")
    for part, accepted in _ACCEPTED.items():
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in accepted):
            raise UserError(f"{folder / MODEL_INDEX}: {part} is {entry!r}, not one of {sorted(accepted)}")
    for part in ("safety_checker", "feature_extractor", "image_encoder"):
        entry = index.get(part)
        if entry not in (None, [None, None]):
            raise UserError(f"{folder / MODEL_INDEX}: {part} {entry!r} has no counterpart in our model")

    # text encoder + tokenizer
    te_json = read_json(folder / TEXT_ENCODER_DIR / "config.json")
    if te_json.get("use_attention_mask"):  # the pipeline would then mask the padding; ours attends to it
        raise UserError(f"{TEXT_ENCODER_DIR}/config.json: use_attention_mask true is not supported"
                        " (SD 1.x and ours run CLIP without a padding mask)")
    te_cfg = config_from_transformers(te_json)
    te_file = _weights(folder, TEXT_ENCODER_DIR, TEXT_ENCODER_WEIGHTS)
    try:
        te_state = from_transformers(load_tensors(te_file), te_cfg)
    except UserError as e:
        raise UserError(f"{TEXT_ENCODER_DIR}/: {e}") from None
    tokenizer = Tokenizer.from_clip_bpe(folder / TOKENIZER_DIR)
    if (tokenizer.vocab_size, tokenizer.eos_id) != (te_cfg.vocab_size, te_cfg.eos_token_id):
        raise UserError(f"{TOKENIZER_DIR}/: its vocabulary ({tokenizer.vocab_size} ids,"
                        f" eos {tokenizer.eos_id}) does not fit the text encoder's ({te_cfg.vocab_size},"
                        f" eos {te_cfg.eos_token_id})")
    if tokenizer.context_length != te_cfg.context_length:
        raise UserError(f"{TOKENIZER_DIR}/: model_max_length {tokenizer.context_length} differs from the text"
                        f" encoder's max_position_embeddings {te_cfg.context_length}")
    text_encoder = TextEncoder(te_cfg)
    text_encoder.load_state_dict(te_state)

    # VAE
    vae_cfg = diffusers_vae.config_from_diffusers(read_json(folder / VAE_DIR / "config.json"))
    vae_state = diffusers_vae.from_diffusers(load_tensors(_weights(folder, VAE_DIR, VAE_WEIGHTS)), vae_cfg)
    vae = VAE(vae_cfg)
    vae.load_state_dict(vae_state)

    # UNet
    unet_cfg = unet_config_from_diffusers(read_json(folder / UNET_DIR / UNET_CONFIG), conditioning="text")
    if unet_cfg.context_dim != te_cfg.width:
        raise UserError(f"{UNET_DIR}/{UNET_CONFIG}: cross_attention_dim {unet_cfg.context_dim} differs from"
                        f" the text encoder's hidden_size {te_cfg.width}")
    if (unet_cfg.in_channels, unet_cfg.image_size) != (vae_cfg.latent_channels, vae_cfg.latent_size):
        raise UserError(f"{UNET_DIR}/{UNET_CONFIG}: in_channels {unet_cfg.in_channels} / sample_size"
                        f" {unet_cfg.image_size} do not fit the VAE's latents ({vae_cfg.latent_channels} x"
                        f" {vae_cfg.latent_size})")
    unet = load_unet_weights(unet_cfg, _weights(folder, UNET_DIR, UNET_WEIGHTS))
    for file in sorted((folder / EMBEDDINGS_FOLDER).glob("*.safetensors")):  # the tokens export wrote
        emb = read_any_embedding(file)
        add_token(text_encoder, tokenizer, emb.token, emb.vectors)
    return unet, _scheduler(folder), vae.eval(), text_encoder.eval(), tokenizer


def import_sd_pipeline(folder: str | Path, out: str | Path) -> Path:
    """``read_sd_pipeline`` and write our prompt model folder (config.json, model.safetensors,
    text_encoder.safetensors, tokenizer/, vae/) to ``out``."""
    unet, diffusion, vae, text_encoder, tokenizer = read_sd_pipeline(folder)
    save_model(Path(out), unet, diffusion, {"imported_from": str(folder)}, vae=vae,
               text=(text_encoder, tokenizer))
    return Path(out)


__all__ = ["export_sd_pipeline", "import_sd_pipeline", "is_sd_pipeline", "model_index", "read_sd_pipeline"]
