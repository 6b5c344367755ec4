"""One mechanism for notes: said with note(), gathered by collect() into a result, a warning otherwise."""
from __future__ import annotations

import warnings

import pytest

from attnflow import AttnflowNote
from attnflow.compare import compare_files
from attnflow.notes import collect, note
from conftest import synthetic, write_metrics


def test_a_note_with_no_collector_is_an_attnflow_note_warning():
    with pytest.warns(AttnflowNote, match="^nothing listens$"):
        note("nothing listens")


def test_a_collector_keeps_its_notes_in_order_once_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with collect() as outer:
            note("first")
            with collect() as inner:
                note("inner only")
                note("inner only")
            note("second")
            note("first")
    assert outer == ["first", "second"] and inner == ["inner only"]


def test_a_comparison_carries_the_notes_of_its_making(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for family, has_cls in (("mim", True), ("jea", False)):
        path = tmp_path / f"{family}.h5"
        write_metrics(path, synthetic(rng, n=12, has_cls=has_cls), family=family, has_cls=has_cls)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttnflowNote)  # the notes are in the result, not warnings
        comparison = compare_files(paths, metrics=["cls_entropy_norm"], n_bootstrap=50)
    assert "jea has no cls token: its cls_* metrics are NaN" in comparison.notes
    assert len(comparison.notes) == len(set(comparison.notes))
