"""pagedserve.bench.step_overhead: the skeleton keeps the model's calls, and a profile splits real
steps."""

from __future__ import annotations

from pathlib import Path

from pagedserve.bench.step_overhead import PHASES, profile, skeleton_of
from pagedserve.model.loader import LoadedModel


def test_skeleton_profile_splits_decode_steps_into_phases(smollm: LoadedModel,
                                                          tmp_path: Path) -> None:
    skeleton = skeleton_of(smollm, tmp_path)
    config, original = skeleton.config, smollm.config
    assert config.num_hidden_layers == original.num_hidden_layers
    assert config.vocab_size == original.vocab_size
    assert config.hidden_size < original.hidden_size
    row = profile(skeleton, "skeleton", "int4", batch=2, tokens=6)
    # Two requests decode together after their prompts: five steps of two decode tokens.
    assert row.steps == 5 and row.batch == 2
    assert set(row.phase_ms) == set(PHASES)
    assert row.phase_ms["forward"] > 0
    assert all(0 <= ms <= row.step_ms for ms in row.phase_ms.values())
