"""`python -m emollm_jax.convert --hf_dir DIR --out DIR [--dtype bfloat16] [--to_hf]`

Without --to_hf: HF directory -> params-only orbax checkpoint (layout in `orbax_params`).
With --to_hf: HF directory -> HF directory in the transformers-5 layout (re-keys older layouts, casts dtype,
re-shards files); with --ckpt DIR instead of --hf_dir, a checkpoint written by this tool -> HF directory;
with --workdir DIR, a training run (its config.json and latest checkpoint, or --step) -> HF directory, its
LoRA adapters merged into the weights. --lora_only (with --workdir) writes the adapters alone in PEFT's
layout (adapter_config.json + adapter_model.safetensors) instead.
An original-LLaVA directory (decoder + `model.mm_projector.*`) needs its CLIP tower too: `--clip_dir DIR`.
"""

from __future__ import annotations

import argparse
import sys

from emollm_jax.convert import load_hf, save_hf
from emollm_jax.convert.core import read_hf_config
from emollm_jax.convert.hf import detect_family, family_of
from emollm_jax.convert.llava import config_to_llava_hf, load_llava_original
from emollm_jax.convert.orbax_params import load_params, save_params
from emollm_jax.convert.safetensors_io import open_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emollm_jax.convert", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="HF model directory (config.json + safetensors)")
    src.add_argument("--ckpt", help="params checkpoint written by this tool (only with --to_hf)")
    src.add_argument("--workdir", help="a training run's workdir (with --to_hf or --lora_only)")
    p.add_argument("--step", type=int, default=None, help="--workdir: checkpoint step (default: latest)")
    p.add_argument("--lora_only", action="store_true", help="write the LoRA adapters alone (PEFT layout)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: float32)")
    p.add_argument("--to_hf", action="store_true", help="write an HF directory, not orbax")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size for --to_hf")
    p.add_argument("--clip_dir", help="local CLIP directory, for an original-LLaVA --hf_dir")
    p.add_argument("--allow_pickle", action="store_true", help="allow pytorch_model.bin (weights_only load)")
    args = p.parse_args(argv)

    if args.ckpt and not args.to_hf:
        p.error("--ckpt needs --to_hf")
    if args.lora_only and not args.workdir:
        p.error("--lora_only needs --workdir")
    if args.workdir and not (args.to_hf or args.lora_only):
        p.error("--workdir needs --to_hf or --lora_only")
    if args.workdir:
        try:
            return _export_run(args)
        except (ValueError, FileNotFoundError) as e:  # no HF form, no adapters, not a run's workdir
            p.exit(2, f"error: {e}\n")
    if args.clip_dir and not args.hf_dir:
        p.error("--clip_dir goes with --hf_dir")
    if args.ckpt:
        model = load_params(args.ckpt)
    elif args.clip_dir:
        model = load_llava_original(args.hf_dir, args.clip_dir, args.dtype)
    else:
        model = load_hf(args.hf_dir, args.dtype, allow_pickle=args.allow_pickle)
    if args.to_hf:
        save_hf(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    else:
        family = family_of(model).name
        if args.clip_dir:  # two source dirs: keep the merged config in the Llava form `load_params` reads
            hf_config = config_to_llava_hf(model.config, image_token_in_vocab=False)
        else:
            hf_config = read_hf_config(args.hf_dir)
            keys = set(open_checkpoint(args.hf_dir, allow_pickle=args.allow_pickle).keys())
            assert detect_family(hf_config, keys, args.hf_dir).name == family
        save_params(model, args.out, family=family, hf_config=hf_config, dtype=args.dtype, source=args.hf_dir)
    print(f"wrote {args.out}")
    return 0


def _export_run(args: argparse.Namespace) -> int:
    """--workdir: the run's model, merged into an HF directory or its adapters alone."""
    from emollm_jax.convert.export import save_peft
    from emollm_jax.experiment import load_run

    model, config = load_run(args.workdir, args.step)
    if args.lora_only:
        save_peft(model, args.out, dtype=args.dtype)
        others = sorted({g for s in config.stage_order for g in config.stages[s].trainable} - {"lora"})
        if others:
            print(f"note: the run also trained {others}; those weights are not in the adapter file "
                  "(--to_hf writes the whole model)", file=sys.stderr)
    else:
        save_hf(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
