"""EmoLLM in JAX/Flax NNX: multimodal emotional understanding with MVP and EmoPrompt."""

import flax

# Parameters carry *logical* axis names (embed, mlp, heads, ...), not mesh axes; emollm_jax.sharding maps them
# to a mesh with the config's rules table. Flax's eager sharding would read them as mesh axes, so turn it off.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
