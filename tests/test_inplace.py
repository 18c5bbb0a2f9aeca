"""`apply_to_model` / `revert_from_model` given a diff file's path, and a clear TypeError for
anything that is neither a path nor a diff (tiny BERT built from a config, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers_models import build, random_diff, save, state_numpy, tiny_bert_config  # noqa: E402
from sftdiff.checkpoint import Checkpoint  # noqa: E402
from sftdiff.diff import SparseDiff  # noqa: E402
from sftdiff.errors import FormatError  # noqa: E402
from sftdiff.inplace import apply_to_model, revert_from_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("inplace")
    save(build(transformers.BertModel, tiny_bert_config(), seed=0), root / "base")
    random_diff(Checkpoint.open(root / "base"), seed=1).save(root / "d.sft")
    return root


def model_of(root: Path):
    import transformers

    return transformers.BertModel.from_pretrained(root / "base")


@pytest.mark.parametrize("as_path", [str, Path])
def test_a_path_is_applied_and_reverted_like_the_loaded_diff(setup, as_path):
    start = state_numpy(model_of(setup))
    expected = model_of(setup)
    apply_to_model(expected, SparseDiff.load(setup / "d.sft"))

    model = model_of(setup)
    record = apply_to_model(model, as_path(setup / "d.sft"))
    assert record.diff.path is not None and Path(record.diff.path).name == "d.sft"
    after = state_numpy(model)
    want = state_numpy(expected)
    assert all(np.array_equal(after[n], want[n]) for n in want)
    assert any(not np.array_equal(after[n], start[n]) for n in start)  # it did change the model

    revert_from_model(model, as_path(setup / "d.sft"))  # the plain diff: subtraction, up to one rounding
    back = state_numpy(model)
    assert all(np.allclose(back[n], start[n], atol=1e-6) for n in start)


@pytest.mark.parametrize("value", [{"w": [1, 2]}, 3, None, b"d.sft"])
def test_anything_else_is_a_one_line_type_error(setup, value):
    model = model_of(setup)
    before = state_numpy(model)
    for call, expected in ((apply_to_model, "a SparseDiff or a diff file's path"),
                           (revert_from_model, "the AppliedDiff record apply_to_model returned, a SparseDiff")):
        with pytest.raises(TypeError) as info:
            call(model, value)
        message = str(info.value)
        assert "\n" not in message and expected in message and type(value).__name__ in message
        assert "(str or os.PathLike)" in message
    after = state_numpy(model)
    assert all(np.array_equal(after[n], before[n]) for n in before)  # nothing was touched


def test_a_missing_path_says_no_such_file(setup, tmp_path):
    with pytest.raises(FormatError, match="nope.sft: no such file"):
        apply_to_model(model_of(setup), tmp_path / "nope.sft")
