"""The interface every model family implements, and the parts all families share.

A family knows, for its checkpoints, how an image becomes crops, how the crops' pooled grids become the
language model's visual token sequence, and the prompt recipe. Both backends call it::

    crops = family.crops(image)                         # PIL images, each exactly the tower's size
    grids = backend.encode(crops)                       # tower + projector, once per crop: (G*G, D) each
    pooled = [scales.pool(g, s) for g in grids]         # M3: the same scale on every crop
    tokens = family.visual_tokens(pooled, image_hw=..., newline=...)
    ids = family.prompt_ids(question, len(tokens), tokenizer_adapter)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from PIL import Image

from m3cli.families.prompts import PromptParts, PromptRecipe, recipe_named
from m3cli.families.spec import FamilySpec
from m3cli.families.tokenizing import TokenizerAdapter


class Family(Protocol):
    """One model family (LLaVA-1.5, LLaVA-NeXT)."""

    spec: FamilySpec
    recipe: PromptRecipe

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """The tower's input images for one RGB image (1.5: one; NeXT: base crop then the tiles)."""
        ...

    def visual_tokens(self, pooled_crops: Sequence[Any], *, image_hw: tuple[int, int] | None = None,
                      newline: Any = None) -> Any:
        """The LM's visual token sequence ``(n, D)`` from each crop's pooled ``(s, D)`` grid (row-major).

        ``image_hw`` is the original image's (height, width) and ``newline`` the learned ``image_newline``
        ``(D,)``: NeXT needs both (tiles arranged, unpadded, a newline per row); 1.5 ignores them.
        Works on torch tensors and NumPy arrays alike.
        """
        ...

    def n_visual_tokens(self, scale: int, *, image_hw: tuple[int, int] | None = None) -> int:
        """How many visual tokens ``visual_tokens`` returns at per-crop scale ``scale``."""
        ...

    def prompt_parts(self, question: str, tok: TokenizerAdapter) -> PromptParts:
        """Ids before and after the visual tokens."""
        ...

    def prompt_ids(self, question: str, n_visual: int, tok: TokenizerAdapter) -> list[int]:
        """The whole prompt with ``n_visual`` image placeholders."""
        ...


class FamilyBase:
    """The prompt side every family shares: the spec's recipe, tokenised through the adapter."""

    def __init__(self, spec: FamilySpec, recipe: PromptRecipe | None = None):
        self.spec = spec
        self.recipe = recipe or recipe_named(spec.prompt_recipe, template=spec.chat_template,
                                             prefix_after_special=spec.prefix_after_special)

    def prompt_parts(self, question: str, tok: TokenizerAdapter) -> PromptParts:
        """Ids before and after the visual tokens, from the family's recipe."""
        return self.recipe.parts(question, tok, self.spec.image_token)

    def prompt_ids(self, question: str, n_visual: int, tok: TokenizerAdapter) -> list[int]:
        """The whole prompt with ``n_visual`` image placeholders."""
        return self.prompt_parts(question, tok).ids(n_visual)


def flat_grid(grid: Any) -> Any:
    """A pooled crop as ``(s, D)`` row-major: a ``(side, side, D)`` grid is flattened, ``(s, D)`` kept."""
    if grid.ndim == 3:
        rows, cols, dim = grid.shape
        return grid.reshape(rows * cols, dim)
    if grid.ndim != 2:
        raise ValueError(f"a pooled crop is (s, D) or (side, side, D), got shape {tuple(grid.shape)}")
    return grid
