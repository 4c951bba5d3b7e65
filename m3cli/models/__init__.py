"""Where a model comes from and what it is made of: the registry of names (``registry``), hub ids through the
local cache (``hub``), cheap checks of weight files (``weights``), the ``--dtype`` names (``dtypes``) and a
fresh standard LLaVA built from a spec (``build``, used by training, the bench's paper-scale shapes and the
tests). Nothing here imports a use case, a backend or a family.
"""
