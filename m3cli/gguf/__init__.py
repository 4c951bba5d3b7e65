"""GGUF format knowledge in one place: what llama.cpp's LLaVA files look like and how we write them.

* ``layout``: the mmproj layout/variant keys, the position-row orders, the mmproj key/value set and tensor
  casting, the rot180 companion's name.
* ``writer``: writing a GGUF file atomically from typed key/values and NumPy tensors.
* ``reader``: the magic check and the header reader shared by every GGUF reader here.
* ``mmproj``: validating an mmproj before llama.cpp sees it, and rewriting legacy ones into our layout.
* ``cache``: the corrected copy of a third-party mmproj, made once into the user cache.

Nothing here imports torch or llama.cpp; the ``gguf`` package is imported only when a file is read or written.
"""
