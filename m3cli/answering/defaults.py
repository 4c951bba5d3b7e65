"""Defaults every answering command shares, in a module light enough for the CLI to import at start-up."""

from __future__ import annotations

# Asked when neither -q nor an input's own row gives a question (m3 ask without QUESTION, m3 batch without -q);
# it is recorded in every row like any other question.
DEFAULT_QUESTION = "What is this?"


def model_policy(model: str | None):
    """The tuned scale policy (a :class:`~m3cli.matryoshka.policy.PolicySpec`) of the model ``--model model``
    names (None: the default model), from its registry entry; None when it has none (then the fallback
    applies: :data:`~m3cli.matryoshka.policy.FALLBACK_POLICY`). A malformed entry is a one-line
    :class:`~m3cli.models.registry.RegistryError`."""
    from m3cli.matryoshka.policy import PolicySpec
    from m3cli.models.registry import RegistryError, find_entry

    entry = find_entry(model)
    if entry is None or entry.policy is None:
        return None
    try:
        return PolicySpec.from_mapping(entry.policy, f"models/registry.yaml: {entry.name}: policy")
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
