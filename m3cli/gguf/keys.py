"""The ``m3cli.*`` metadata keys of a language-model GGUF written by ``m3 convert --to gguf`` (llama.cpp ignores them).

The recipe keys themselves belong to the family layer (``m3cli.prompt_recipe``:
:data:`m3cli.families.prompts.GGUF_RECIPE_KEY`, ``m3cli.image_aspect_ratio``:
:data:`m3cli.families.gguf_spec.GGUF_ASPECT_KEY`); these two are the backend's.
"""

IMAGE_TOKEN_ID_KEY = "m3cli.image_token_id"
# true when the transformers tokenizer puts a "▁" after special tokens (a ``legacy`` Llama tokenizer), so the
# llama.cpp backend's recipe tokenises as the torch backend's does
PREFIX_AFTER_SPECIAL_KEY = "m3cli.prefix_after_special"

# LLaVA-1.6 (anyres) mmproj keys. m3's corrected mmproj copy moves them under ``m3cli.anyres.*``: mtmd then
# encodes a tower-size bitmap as one crop on LLaVA-1.5's fixed-size path (it would otherwise cut and pack the
# crops itself), while m3's family layer cuts the crops, pools each one and packs them with the newline.
ANYRES_MMPROJ_KEYS = {
    "clip.vision.image_grid_pinpoints": "m3cli.anyres.image_grid_pinpoints",
    "clip.vision.mm_patch_merge_type": "m3cli.anyres.mm_patch_merge_type",
    "clip.vision.image_aspect_ratio": "m3cli.anyres.image_aspect_ratio",
}
# the learned newline of a LLaVA-1.6 mmproj: llama.cpp's legacy converter writes the first, newer ones the second
IMAGE_NEWLINE_TENSORS = ("model.image_newline", "v.image_newline")
