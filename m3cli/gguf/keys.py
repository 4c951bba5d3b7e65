"""The ``m3cli.*`` metadata keys of a language-model GGUF written by ``m3 convert --to gguf`` (llama.cpp ignores them).

The recipe keys themselves belong to the family layer (``m3cli.prompt_recipe``:
:data:`m3cli.families.prompts.GGUF_RECIPE_KEY`, ``m3cli.image_aspect_ratio``:
:data:`m3cli.families.gguf_spec.GGUF_ASPECT_KEY`); these two are the backend's.
"""

IMAGE_TOKEN_ID_KEY = "m3cli.image_token_id"
# true when the transformers tokenizer puts a "▁" after special tokens (a ``legacy`` Llama tokenizer), so the
# llama.cpp backend's recipe tokenises as the torch backend's does
PREFIX_AFTER_SPECIAL_KEY = "m3cli.prefix_after_special"
