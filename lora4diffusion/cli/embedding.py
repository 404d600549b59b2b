"""The textual-inversion commands: train-embedding (a new token's vectors on a frozen prompt base) and
export-embedding / import-embedding (diffusers' and AUTOMATIC1111's files)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lora4diffusion.cli.args import (
    batch_int,
    bounded_int,
    fraction_float,
    learning_rate,
    per_digit_int,
    positive_int,
    seed_int,
)
from lora4diffusion.cli.common import (
    Commands,
    compile_arg,
    existing,
    out_dir,
    overwrite_arg,
    run_dir_args,
    train_out,
    train_with_signals,
)
from lora4diffusion.datasets import layout_of
from lora4diffusion.errors import UserError
from lora4diffusion.formats.embeddings import (
    EMBEDDING_FORMATS,
    embedding_path,
    read_any_embedding,
    write_embedding,
)
from lora4diffusion.styles import CSV_FORMAT
from lora4diffusion.training.embedding import EMBEDDING_LR, EMBEDDING_STEPS, train_embedding

MAX_VECTORS = 14  # a prompt holds 14 tokens (context 16 with bos and eos)


def add_train_embedding(sub: Commands) -> None:
    te = sub.add_parser("train-embedding",
                        help="textual inversion: learn a new token's vectors (the base frozen)")
    te.add_argument("--checkpoint", metavar="DIR|NAME", help="prompt base model (default: the shipped base)")
    te.add_argument("--style", required=True, help="bold | thin | italic | FOLDER (subfolders 0-9 of images)"
                    f" | FILE.csv ({CSV_FORMAT})")
    te.add_argument("--token", required=True, metavar="<NAME>",
                    help="the new placeholder token, written <name> (e.g. \"<bold-ti>\")")
    te.add_argument("--init-word", metavar="WORD",
                    help="start every vector at this vocabulary word's row (default: the mean of the words')")
    te.add_argument("--num-vectors", type=bounded_int(1, MAX_VECTORS, "a prompt holds 14 tokens"), default=1,
                    metavar="N", help="vectors (token ids) the token stands for")
    te.add_argument("--out", required=True, help="run directory; the embedding is OUT/embedding.safetensors")
    te.add_argument("--max-train-steps", type=positive_int, metavar="N",
                    help=f"training steps (default {EMBEDDING_STEPS})")
    te.add_argument("--lr", type=learning_rate, help=f"learning rate (default {EMBEDDING_LR:g})")
    te.add_argument("--batch-size", type=batch_int, help="batch (default 64)")
    te.add_argument("--ema", type=fraction_float, help="EMA decay of the vectors (default 0.995)")
    te.add_argument("--seed", type=seed_int, help="training seed (default 0)")
    te.add_argument("--examples-per-digit", type=per_digit_int, metavar="N",
                    help="few-shot: train on N examples per digit (default: every example)")
    te.add_argument("--data", default="embedded", help="MNIST source for the built-in styles")
    te.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    run_dir_args(te)
    compile_arg(te)
    te.set_defaults(func=cmd_train_embedding)


def add_embedding_formats(sub: Commands) -> None:
    ex = sub.add_parser("export-embedding", help="an embedding as diffusers' or AUTOMATIC1111's file")
    ex.add_argument("--embedding", required=True, metavar="FILE|NAME", help="the embedding (any layout)")
    ex.add_argument("--format", required=True, choices=EMBEDDING_FORMATS,
                    help="diffusers: learned_embeds.safetensors (load_textual_inversion) | a1111:"
                    " NAME.safetensors for A1111's embeddings/ folder (its prompt word is NAME, the token"
                    " without <>)")
    ex.add_argument("--out", required=True, help="output folder")
    overwrite_arg(ex)
    ex.set_defaults(func=cmd_export_embedding)
    im = sub.add_parser("import-embedding", help="a diffusers or AUTOMATIC1111 embedding file as ours")
    im.add_argument("path", metavar="FILE", help="learned_embeds.safetensors, an A1111 .safetensors, or ours")
    im.add_argument("--token", metavar="<NAME>", help="rename its token (default: the file's)")
    im.add_argument("--out", required=True, help="folder for embedding.safetensors")
    overwrite_arg(im)
    im.set_defaults(func=cmd_import_embedding)


def cmd_train_embedding(args: argparse.Namespace) -> int:
    if layout_of(Path(args.data).expanduser()) is not None:  # its captions would need the token in them
        raise UserError(f"train-embedding --data {args.data}: a captioned image folder trains a LoRA"
                        " (train-lora --data), not yet an embedding; give --style FOLDER of 0-9 subfolders")
    out = train_out(args, inputs=existing(args.checkpoint, args.style, args.data))
    r, status = train_with_signals(
        train_embedding, out, args.style, out, args.token, base=args.checkpoint, init_word=args.init_word,
        num_vectors=args.num_vectors, data=args.data, per_digit=args.examples_per_digit, resume=args.resume,
        progress=not args.quiet, steps=args.max_train_steps, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, ema_decay=args.ema, bf16=args.bf16, device=args.device, compile=args.compile,
        overwrite=args.overwrite, allow_changes=args.allow_changes,
    )
    if r is None:
        return status
    loss = f"loss {r['loss']:.4f}" if math.isfinite(r["loss"]) else "no step trained"
    print(f"{'interrupted (resumable: --resume)' if r['interrupted'] else 'done'}: embedding {args.token} in"
          f" {out}, step {r['step']}, {loss}, {r['trainable_params']} trainable parameters,"
          f" {r['train_seconds']:.0f} s of training")
    return status


def cmd_export_embedding(args: argparse.Namespace) -> int:
    _, source = embedding_path(args.embedding)
    emb = read_any_embedding(args.embedding)  # read and checked before --out is touched
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    out.mkdir(parents=True, exist_ok=True)
    path = write_embedding(emb, args.format, out)
    print(f"wrote {path} ({args.format}; token {emb.token}, {emb.num_vectors} vector(s))")
    return 0


def cmd_import_embedding(args: argparse.Namespace) -> int:
    _, source = embedding_path(args.path)
    emb = read_any_embedding(source, token=args.token)
    out = out_dir(args.out, overwrite=args.overwrite, inputs=(source,))
    out.mkdir(parents=True, exist_ok=True)
    if emb.fingerprint == "unknown":
        emb.extra.setdefault("imported_from", str(source))
    path = emb.save(out)
    print(f"wrote {path} (token {emb.token}, {emb.num_vectors} vector(s))")
    return 0


def embedding_args(p: argparse.ArgumentParser) -> None:
    """sample's --embedding FILE|NAME (repeatable)."""
    p.add_argument("--embedding", action="append", default=[], metavar="FILE|NAME",
                   help="prompt models: a textual-inversion embedding (ours, diffusers' learned_embeds or"
                   " A1111's; a shipped one's name); its token then works in prompts; repeatable")


__all__ = ["add_embedding_formats", "add_train_embedding", "embedding_args"]
