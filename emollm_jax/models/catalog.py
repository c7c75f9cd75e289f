"""The parts that ship with emollm_jax: importing this module registers them in `emollm_jax.models.parts`.

A new part is a model file whose config class carries `@vision_tower(...)`, `@audio_tower(...)`,
`@projector(...)` or `@decoder(...)`, plus its import line here (or, for a part kept outside the project, an
import of its module before the config is read).
"""

from emollm_jax.models import clip, llama, projectors, whisper  # noqa: F401

__all__ = ["clip", "llama", "projectors", "whisper"]
