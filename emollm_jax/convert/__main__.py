"""`python -m emollm_jax.convert --hf_dir DIR --out DIR [--dtype bfloat16] [--to_hf] [--overwrite]`

Without --to_hf: HF directory -> params-only orbax checkpoint (layout in `orbax_params`).
With --to_hf: HF directory -> HF directory in the transformers-5 layout (re-keys older layouts, casts dtype,
re-shards files); with --ckpt DIR instead of --hf_dir, a checkpoint written by this tool -> HF directory;
with --workdir DIR, a training run (its config.json and latest checkpoint, or --step) -> HF directory, its
LoRA adapters merged into the weights. --lora_only (with --workdir) writes the adapters alone in PEFT's
layout (adapter_config.json + adapter_model.safetensors) instead.
An original-LLaVA directory (decoder + `model.mm_projector.*`) needs its CLIP tower too: `--clip_dir DIR`.

--out is never written over what this tool did not write: an existing non-empty directory is refused unless
--overwrite, and even then only one this tool wrote (its `.emollm_jax_output` marker); an --out equal to,
inside, or containing a source directory is refused. Flags are checked, by name, before anything is read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")  # what --dtype accepts; 8-bit floats only with --allow_fp8


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emollm_jax.convert", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="HF model directory (config.json + safetensors)")
    src.add_argument("--ckpt", help="params checkpoint written by this tool (only with --to_hf)")
    src.add_argument("--workdir", help="a training run's workdir (with --to_hf or --lora_only)")
    p.add_argument("--step", type=int, default=None, help="--workdir: checkpoint step (default: latest)")
    p.add_argument("--lora_only", action="store_true", help="write the LoRA adapters alone (PEFT layout)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out this tool wrote")
    p.add_argument("--dtype", default=None, help=f"parameter dtype: {', '.join(DTYPES)} (default: float32)")
    p.add_argument("--allow_fp8", action="store_true",
                   help="allow an 8-bit float --dtype with --to_hf (a plain cast of the exported tensors)")
    p.add_argument("--to_hf", action="store_true", help="write an HF directory, not orbax")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size for --to_hf")
    p.add_argument("--clip_dir", help="local CLIP directory, for an original-LLaVA --hf_dir")
    p.add_argument("--allow_pickle", action="store_true", help="allow pytorch_model.bin (weights_only load)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked by name before anything is read or written (`p.error`: usage + one line, exit 2)."""
    from emollm_jax.outdir import OutputDirError, check_output_dir

    if args.ckpt and not args.to_hf:
        p.error("--ckpt needs --to_hf")
    if args.lora_only and not args.workdir:
        p.error("--lora_only needs --workdir")
    if args.workdir and not (args.to_hf or args.lora_only):
        p.error("--workdir needs --to_hf or --lora_only")
    if args.clip_dir and not args.hf_dir:
        p.error("--clip_dir goes with --hf_dir")
    for flag in ("hf_dir", "ckpt", "clip_dir", "workdir"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            p.error(f"--{flag} {value}: {'not a directory' if Path(value).exists() else 'no such directory'}")
    if args.dtype is not None:
        args.dtype = _check_dtype(p, args.dtype, args.allow_fp8)
        if _is_fp8(args.dtype) and not args.to_hf:
            p.error(f"--dtype {args.dtype}: the model runs in {', '.join(DTYPES)}; 8-bit floats are only "
                    "written as an HF export (--to_hf --allow_fp8)")
    if not args.max_shard_gb > 0:
        p.error(f"--max_shard_gb {args.max_shard_gb}: must be positive")
    sources = [(f"--{f}", getattr(args, f)) for f in ("hf_dir", "ckpt", "clip_dir") if getattr(args, f)]
    if args.workdir and Path(args.workdir).resolve().is_relative_to(Path(args.out).resolve()):
        p.error(f"--out {args.out}: is or contains --workdir {args.workdir}")  # inside it is fine
    try:
        check_output_dir(args.out, overwrite=args.overwrite, sources=sources, overwrite_hint="--overwrite")
    except OutputDirError as e:
        p.error(f"--out {e}")


def _check_dtype(p: argparse.ArgumentParser, value: str, allow_fp8: bool) -> str:
    """The dtype's canonical name; anything but DTYPES (and 8-bit floats with --allow_fp8) is refused."""
    import jax.numpy as jnp

    try:
        name = jnp.dtype(value).name
    except TypeError:
        p.error(f"--dtype {value}: not a dtype; expected one of {', '.join(DTYPES)}")
    if _is_fp8(name):
        if not allow_fp8:
            p.error(f"--dtype {value}: an 8-bit float keeps 2-3 mantissa bits of every weight (a plain cast, "
                    "no scaling); pass --allow_fp8 to write it anyway")
        return name
    if name not in DTYPES:
        p.error(f"--dtype {value}: not supported; expected one of {', '.join(DTYPES)}")
    return name


def _is_fp8(name: str) -> bool:
    return name.startswith("float8")


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from emollm_jax.convert.safetensors_io import CheckpointError
    from emollm_jax.outdir import OutputDirError

    if args.workdir:
        try:
            return _export_run(args)
        except (ValueError, FileNotFoundError) as e:  # no HF form, no adapters, not a run's workdir
            p.exit(2, f"error: {e}\n")
        except OutputDirError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return 1
    try:
        convert(args)
    except (CheckpointError, OutputDirError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {args.out}")
    return 0


def convert(args: argparse.Namespace) -> None:
    """Reads the source the flags name and writes --out."""
    from emollm_jax.convert import load_hf, save_hf
    from emollm_jax.convert.core import read_hf_config
    from emollm_jax.convert.hf import detect_family, family_of
    from emollm_jax.convert.llava import config_to_llava_hf, load_llava_original
    from emollm_jax.convert.orbax_params import load_params, save_params
    from emollm_jax.convert.safetensors_io import open_checkpoint

    load_dtype = None if args.dtype and _is_fp8(args.dtype) else args.dtype  # fp8: cast on export only
    if args.ckpt:
        model = load_params(args.ckpt)
    elif args.clip_dir:
        model = load_llava_original(args.hf_dir, args.clip_dir, load_dtype)
    else:
        model = load_hf(args.hf_dir, load_dtype, allow_pickle=args.allow_pickle)
    if args.to_hf:
        save_hf(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                overwrite=args.overwrite)
        return
    family = family_of(model).name
    if args.clip_dir:  # two source dirs: keep the merged config in the Llava form `load_params` reads
        hf_config = config_to_llava_hf(model.config, image_token_in_vocab=False)
    else:
        hf_config = read_hf_config(args.hf_dir)
        keys = set(open_checkpoint(args.hf_dir, allow_pickle=args.allow_pickle).keys())
        assert detect_family(hf_config, keys, args.hf_dir).name == family
    save_params(model, args.out, family=family, hf_config=hf_config, dtype=args.dtype, source=args.hf_dir,
                overwrite=args.overwrite)


def _export_run(args: argparse.Namespace) -> int:
    """--workdir: the run's model, merged into an HF directory or its adapters alone."""
    from emollm_jax.convert.export import save_hf, save_peft
    from emollm_jax.experiment import load_run

    model, config = load_run(args.workdir, args.step)
    if args.lora_only:
        save_peft(model, args.out, dtype=args.dtype, overwrite=args.overwrite)
        others = sorted({g for s in config.stage_order for g in config.stages[s].trainable} - {"lora"})
        if others:
            print(f"note: the run also trained {others}; those weights are not in the adapter file "
                  "(--to_hf writes the whole model)", file=sys.stderr)
    else:
        save_hf(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
