"""The answering use case every command shares: ``core`` (encode once, run each query's policy rung by rung,
results and timings), ``encode_cache`` (encodings reused across questions), ``collage`` (the paper's video
keyframe grid) and ``defaults`` (light constants the CLI reads at start-up). ``m3 ask``, the batch engines,
``m3 eval`` and the server call it; it imports backends, the M3 maths and leaves, never a use case.
"""
