"""Packing several questions about one image into one training sequence.

Layout: ``[prefix][image tokens][q1 a1 </s>][q2 a2 </s>]...``. Each question segment sees the
shared prefix + image and its own tokens only (block mask), and its positions restart right
after the image, so every segment is trained exactly as the single-question prompt it stands
for at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_SLOT = -1  # placeholder id in packed ids: the pooled visual tokens go there
IGNORE = -100


@dataclass
class Packed:
    ids: list[int]  # IMAGE_SLOT where visual tokens go
    labels: list[int]  # next-token targets (IGNORE where no loss)
    positions: list[int]
    segments: list[int]  # 0: shared prefix + image; k >= 1: question k; -1: padding


def pack(prefix: Sequence[int], n_image: int, segments: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Packed:
    """Pack (question ids, answer ids incl. EOS) pairs after a shared prefix and ``n_image`` slots.

    ``labels[t]`` is the token that position t must predict: answer tokens are predicted from
    the position before them (the last question token predicts the first answer token).
    """
    ids = list(prefix) + [IMAGE_SLOT] * n_image
    shared = len(ids)
    labels = [IGNORE] * shared
    positions = list(range(shared))
    segs = [0] * shared
    for k, (question, answer) in enumerate(segments, start=1):
        tokens = list(question) + list(answer)
        ids += tokens
        positions += range(shared, shared + len(tokens))
        segs += [k] * len(tokens)
        seg_labels = [IGNORE] * len(tokens)
        for j in range(len(answer)):
            seg_labels[len(question) - 1 + j] = answer[j]
        labels += seg_labels
    return Packed(ids, labels, positions, segs)


def block_mask(segments_batch, device=None):
    """4D bool attention mask ``(B, 1, T, T)``: causal, and a segment sees only itself and segment 0.

    Padding (-1) attends to itself only, which keeps softmax rows finite.
    """
    import torch

    seg = torch.as_tensor(segments_batch, device=device)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    to_shared = (seg[:, None, :] == 0) & (seg[:, :, None] >= 0)
    allowed = (same | to_shared) & causal
    pad = seg == -1
    eye = torch.eye(length, dtype=torch.bool, device=seg.device)
    allowed = torch.where(pad[:, :, None], eye[None], allowed)
    return allowed[:, None]


def pad_batch(packs: Sequence[Packed], pad_id: int) -> tuple[list[list[int]], ...]:
    """Right-pad packed sequences to one length."""
    length = max(len(p.ids) for p in packs)
    ids, labels, positions, segs = [], [], [], []
    for p in packs:
        extra = length - len(p.ids)
        ids.append(p.ids + [pad_id] * extra)
        labels.append(p.labels + [IGNORE] * extra)
        positions.append(p.positions + [0] * extra)
        segs.append(p.segments + [-1] * extra)
    return ids, labels, positions, segs
