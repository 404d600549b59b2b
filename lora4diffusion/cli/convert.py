"""Commands that write a model or an adapter from others: merge, merge-lora (adapters into one adapter),
extract (SVD of a fine-tune), resize, and conversion to and from other tools' layouts (diffusers folders;
diffusers, kohya and PEFT LoRA files)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora4diffusion.catalog import pretrained_dir
from lora4diffusion.cli.args import add_loras, lora_args, parse_loras, rank_int
from lora4diffusion.cli.common import Commands, existing, lora_inputs, out_dir, overwrite_arg, renamed
from lora4diffusion.cli.embedding import embedding_args
from lora4diffusion.distributed import resolve_device
from lora4diffusion.errors import UserError
from lora4diffusion.finite import require_finite
from lora4diffusion.folders.model import load_model, save_model
from lora4diffusion.formats import detect, read_any, write_lora
from lora4diffusion.formats.diffusers import export_diffusers, import_diffusers
from lora4diffusion.lora.adapters import base_fingerprint, export_peft, import_peft, resolve_adapter
from lora4diffusion.lora.combine import MERGE_METHODS, Source, merge_adapters
from lora4diffusion.lora.extract import convert_to_lora, extract_lora, resize_adapter
from lora4diffusion.lora.layers import unload_lora
from lora4diffusion.lora.prompt_lora import TE_PREFIX
from lora4diffusion.pipeline import Pipeline
from lora4diffusion.training.lora import load_base


def add_merge(sub: Commands) -> None:
    m = sub.add_parser("merge", help="merge adapters into the base and write a standalone checkpoint")
    m.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    m.add_argument("--out", required=True, help="folder for the merged model")
    overwrite_arg(m)
    lora_args(m, required=True)
    embedding_args(m)  # a pivotal adapter's tokens come with it; --embedding adds textual-inversion ones
    m.set_defaults(func=cmd_merge)


def add_merge_lora(sub: Commands) -> None:
    ml = sub.add_parser("merge-lora", help="merge LoRA adapters, each at a weight, into one adapter file")
    ml.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]",
                    help="an adapter (any layout --lora reads, or a shipped adapter's name) and its weight"
                    " (default 1); repeat, one per adapter")
    ml.add_argument("--method", choices=MERGE_METHODS, default="concat",
                    help="concat: exact, rank = the sum of the ranks (peft's cat); svd: the sum truncated to"
                    " --rank by SVD, its error printed (kohya's svd_merge_lora)")
    ml.add_argument("--rank", type=rank_int, help="with --method svd: the merged rank (default: the largest"
                    " source rank)")
    ml.add_argument("--out", required=True, help="folder for adapter.safetensors")
    overwrite_arg(ml)
    ml.set_defaults(func=cmd_merge_lora)


def add_extract(sub: Commands) -> None:
    ex = sub.add_parser("extract", help="extract a rank-r LoRA from a fully fine-tuned checkpoint (SVD)")
    ex.add_argument("--checkpoint", metavar="DIR|NAME", help="base model (default: the shipped base)")
    renamed(ex, "--base", "--checkpoint")
    ex.add_argument("--tuned", required=True, help="the fine-tuned model directory")
    ex.add_argument("--rank", type=rank_int, required=True, help="rank of the extracted LoRA")
    ex.add_argument("--targets", default="all-linear",
                    help="modules to capture, as train-lora's --targets (the same default)")
    ex.add_argument("--out", required=True, help="folder for adapter.safetensors")
    overwrite_arg(ex)
    ex.set_defaults(func=cmd_extract)


def add_resize(sub: Commands) -> None:
    rs = sub.add_parser("resize", help="change an adapter's rank by SVD")
    rs.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    rs.add_argument("--rank", type=rank_int, required=True, help="the new rank")
    rs.add_argument("--checkpoint", metavar="DIR|NAME",
                    help="dora/loha/lokr adapters: the base they were trained on, which turning them into a"
                    " LoRA needs (default: the shipped base)")
    rs.add_argument("--force", action="store_true", help="with --checkpoint: load onto a different base")
    rs.add_argument("--out", required=True, help="folder for adapter.safetensors")
    overwrite_arg(rs)
    rs.set_defaults(func=cmd_resize)


def add_format_parsers(sub: Commands) -> None:
    """export-diffusers, import-diffusers, export-lora: other tools' layouts (docs/INTEROP.md)."""
    xd = sub.add_parser("export-diffusers", help="write a diffusers folder (UNet, scheduler, labels; a prompt"
                        " model: a whole StableDiffusionPipeline)")
    xd.add_argument("--checkpoint", help="model directory (default: the shipped base)")
    xd.add_argument("--out", required=True, help="folder for unet/, scheduler/, label_context.safetensors")
    xd.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    xd.set_defaults(func=cmd_export_diffusers)

    idf = sub.add_parser("import-diffusers", help="convert a diffusers folder to our model")
    idf.add_argument("folder", help="folder with unet/, scheduler/, label_context.safetensors, or a"
                     " StableDiffusionPipeline folder (model_index.json)")
    idf.add_argument("--out", required=True, help="model directory (config.json + model.safetensors)")
    idf.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    idf.set_defaults(func=cmd_import_diffusers)

    xl = sub.add_parser("export-lora", help="write an adapter as a diffusers, kohya or PEFT LoRA file")
    xl.add_argument("--lora", required=True, help="adapter (any layout we read) or a shipped adapter's name")
    xl.add_argument("--format", required=True, choices=["diffusers", "kohya", "peft"])
    xl.add_argument("--out", required=True, help="output folder")
    xl.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    xl.set_defaults(func=cmd_export_lora)


def add_peft(sub: Commands) -> None:
    """export-peft, import-peft."""
    xp = sub.add_parser("export-peft", help="write an adapter in PEFT's layout")
    xp.add_argument("--lora", required=True, help="adapter directory or file, or a shipped adapter's name")
    xp.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    overwrite_arg(xp)
    xp.set_defaults(func=cmd_export_peft)

    ip = sub.add_parser("import-peft", help="convert a PEFT LoRA adapter directory into ours")
    ip.add_argument("--peft", required=True, help="directory with adapter_config.json")
    ip.add_argument("--checkpoint", metavar="DIR|NAME",
                    help="base model to fingerprint the adapter against (default: the shipped base)")
    ip.add_argument("--out", required=True, help="folder for adapter.safetensors")
    overwrite_arg(ip)
    ip.set_defaults(func=cmd_import_peft)


def cmd_merge(args: argparse.Namespace) -> int:
    base = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    inputs = existing(base, *args.embedding) + lora_inputs(args.lora)
    out = out_dir(args.out, overwrite=args.overwrite, inputs=inputs)
    pipe = Pipeline.load(args.checkpoint).to(args.device)  # the merge is fp32 (exact): --bf16 is unused
    for emb in args.embedding:
        pipe.add_embedding(emb, force=args.force)
    loras = add_loras(pipe, args)
    model = unload_lora(pipe.unet, merge=True)
    if pipe.is_prompt_model:  # text-encoder LoRA (train-lora --text-encoder) is merged into it as well
        unload_lora(pipe.text_encoder, merge=True)
    pipe.to("cpu")
    require_finite(model.state_dict(), "merge")  # an overflowing scale or adapter: no garbage checkpoint
    merged_from = [{"adapter": p, "scale": w if isinstance(w, float) else str(w), "name": n}
                   for p, w, n in loras]
    extra = {"merged_from": merged_from, "base": pipe.config.get("base_path")}
    # keeps its VAE and text parts; added tokens (a pivotal adapter's) go in embeddings/ beside them
    save_model(out, model, pipe.diffusion, extra, vae=pipe.vae, text=pipe.text)
    tokens = list(pipe.text_encoder.added_tokens.tokens) if pipe.is_prompt_model else []
    print(f"merged {len(loras)} adapter(s) into {out}" + (f" (tokens {', '.join(tokens)} in"
                                                           f" {out}/embeddings)" if tokens else ""))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    loras = parse_loras(args.lora)  # every argument checked before any file is read
    split = next((p for p, w in loras if not isinstance(w, float)), None)
    if split is not None:
        raise UserError(f"--lora {split}: merge-lora takes one weight per adapter (PATH[:WEIGHT]); its"
                        " text-encoder and UNet weights differ only when sampling")
    out = out_dir(args.out, overwrite=args.overwrite, inputs=lora_inputs(args.lora))
    sources = [Source(read_any(path), weight, path) for path, weight in loras]  # any layout --lora reads
    adapter, errors = merge_adapters(sources, args.method, args.rank)
    require_finite(adapter.tensors, "merge-lora")
    adapter.save(out)
    if args.method == "concat":
        how = "exact: at weight 1 it draws the stacked adapters' images"
    else:
        worst = max((v for k, v in errors.items() if k != "overall"), default=0.0)
        how = f"relative approximation error {errors['overall']:.4g} overall, {worst:.4g} worst module"
    print(f"merged {len(sources)} adapter(s) by {args.method} into a rank-{adapter.rank} adapter in {out}"
          f" ({how})")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    base_dir = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=existing(base_dir, args.tuned))
    device = resolve_device(args.device)
    base, _, _, _ = load_base(args.checkpoint)
    tuned, _, _ = load_model(Path(args.tuned))
    adapter, errors = extract_lora(base.to(device), tuned.to(device), args.rank, args.targets)  # SVD in fp64
    adapter.tensors = {k: v.cpu() for k, v in adapter.tensors.items()}
    adapter.fingerprint = base_fingerprint(base)
    require_finite(adapter.tensors, "extract")
    adapter.save(out)
    missed = int(errors.get("uncaptured", 0))
    note = (f"; {missed} changed tensor(s) outside --targets {args.targets} are not captured (counted in the"
            " error)") if missed else ""
    print(
        f"extracted rank-{args.rank} adapter ({len(adapter.modules)} modules) to {out}; "
        f"relative approximation error {errors['overall']:.4g}{note}"
    )
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    source = read_any(args.lora)  # any layout sample --lora reads
    if source.method == "lora":
        out = out_dir(args.out, overwrite=args.overwrite, inputs=(resolve_adapter(args.lora),))
        adapter, errors = resize_adapter(source, args.rank)
        what = "resized to"
    else:  # DoRA / LoHa / LoKr -> LoRA: the SVD of each module's ΔW, which for DoRA depends on the base
        pipe = Pipeline.load(args.checkpoint)
        out = out_dir(args.out, overwrite=args.overwrite, inputs=(resolve_adapter(args.lora),
                                                                    args.checkpoint or str(pretrained_dir())))
        name = pipe.add_lora(source, force=args.force)
        parts = {"": pipe.unet}
        if pipe.is_prompt_model:
            parts[TE_PREFIX] = pipe.text_encoder
        adapter, errors = convert_to_lora(parts, name, args.rank, source)
        what = f"converted {source.method} to a LoRA of"
    require_finite(adapter.tensors, "resize")
    adapter.save(out)
    worst = max((v for k, v in errors.items() if k != "overall"), default=0.0)
    print(
        f"{what} rank {args.rank} in {out}; relative approximation error {errors['overall']:.4g} "
        f"overall, {worst:.4g} worst module"
    )
    return 0


def cmd_export_diffusers(args: argparse.Namespace) -> int:
    source = args.checkpoint or str(pretrained_dir())
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    pipe = Pipeline.load(args.checkpoint)
    export_diffusers(pipe.unet, pipe.diffusion, out, source=args.checkpoint or "the shipped base",
                     vae=pipe.vae, text=pipe.text)
    parts = "unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json: StableDiffusionPipeline" \
        if pipe.is_prompt_model else "unet/, scheduler/, label_context.safetensors, README.md"
    print(f"wrote a diffusers folder ({parts}) to {out}")
    return 0


def cmd_import_diffusers(args: argparse.Namespace) -> int:
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(args.folder,))
    import_diffusers(args.folder, out)
    print(f"imported {args.folder} into {out}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    _, source = detect(args.lora)
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    adapter = read_any(args.lora)
    title = source.parent.name if source.name == "adapter.safetensors" else source.stem if source.is_file() \
        else source.name
    written = write_lora(adapter, args.format, out, title=title or "adapter")
    print(f"wrote {args.format} LoRA ({len(adapter.modules)} modules) to {written}")
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(resolve_adapter(args.lora),))
    export_peft(read_any(args.lora), out)  # any layout sample --lora reads
    print(f"wrote PEFT adapter (adapter_config.json, adapter_model.safetensors) to {out}")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    base = args.checkpoint if args.checkpoint is not None else pretrained_dir()
    out = out_dir(args.out, overwrite=args.overwrite, inputs=existing(args.peft, base))
    base, _, _, _ = load_base(args.checkpoint)
    import_peft(args.peft, base_model=base).save(out)
    print(f"imported PEFT adapter into {out}")
    return 0
