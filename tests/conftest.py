import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A tiny run of every stage and the baseline, 2 steps each, on 6 episodes at 32 x 32 (infer and eval tests)."""
    import data
    import train
    root = str(tmp_path_factory.mktemp("data"))
    data.generate(root, episodes=6, seed=4, per_shard=6, image_size=32)
    out = tmp_path_factory.mktemp("run")
    base = train.PRESETS["tiny"][1]
    train.main(dataclasses.replace(base, run_dir=str(out), data=dataclasses.replace(base.data, root=root), steps=(2,) * 5))
    return str(out)
