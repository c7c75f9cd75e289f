"""Hugging Face <-> emollm_jax conversion.

    from emollm_jax.convert import load_hf, save_hf
    model = load_hf("path/to/hf_dir", dtype="float32")   # a decoder, a vision tower, or an EmoLLM (Llava)
    save_hf(model, "path/to/out")                          # transformers.from_pretrained loads it

Checkpoints are streamed tensor by tensor with numpy (`safetensors_io`), mapped through the key tables the
parts declare (`PartConfig.hf_key_table()`: rows of HF key, our nnx.State path, hook name; `keymap.KeyMap`),
and written into a model built abstractly with `nnx.eval_shape` (no random init of big weights). Every
checkpoint key must be consumed (or ignored on purpose by the table) and every parameter filled, else
`CheckpointError` names the keys; shape mismatches name the key and both shapes. `shardings=` places each
tensor on a mesh as it is read.

Which model a directory holds (`hf.detect_family`): any registered part alone (its config class says which
HF `model_type` it reads and under which key prefixes its weights sit), or a composite layout (`llava.LLAVA`:
tower + projector + decoder, each the registered part the checkpoint's sub-configs name). A new tower or
decoder needs nothing here; a new composite layout is a `core.Family` passed to `register_family`.

CLI: `python -m emollm_jax.convert --hf_dir DIR --out DIR [--dtype bfloat16]` writes an orbax checkpoint
(see `__main__`); add `--to_hf` to write an HF directory instead.
"""

from emollm_jax.convert.core import Family
from emollm_jax.convert.export import save_hf
from emollm_jax.convert.hf import load_hf, register_family
from emollm_jax.convert.keymap import KeyMap
from emollm_jax.convert.safetensors_io import CheckpointError, open_checkpoint

__all__ = ["CheckpointError", "Family", "KeyMap", "load_hf", "open_checkpoint", "register_family", "save_hf"]
