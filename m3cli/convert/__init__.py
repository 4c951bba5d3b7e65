"""Model conversions, built on the GGUF primitives of ``m3cli.gguf``.

* ``original_llava.convert_original_to_hf``: original (haotian-liu) LLaVA checkpoints -> HF layout
  (with ``original_weights`` reading the checkpoint and ``original_parts`` building its tokenizer,
  processor and tower config).
* ``gguf_writer.convert_to_gguf``: HF LLaVA (read by ``hf_llava``) -> language-model GGUF + mmproj GGUF
  for llama.cpp, in the layout that makes llama.cpp's LLaVA encoder return Hugging Face-equal features.

Repairing and validating third-party mmproj files is GGUF work: see ``m3cli.gguf.mmproj``.
"""
