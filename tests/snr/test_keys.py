"""SNR keys: the texts of the trajectory CSV and of plan.json against the typed values in code."""

from __future__ import annotations

import pytest

from lowmem.snr import TrajectoryError, read_trajectory
from lowmem.snr.keys import SnrKey, ViewLabel, format_shape, format_subset, parse_shape, parse_subset


@pytest.mark.parametrize("text, key", [
    ("0,1", SnrKey("raw", (0, 1))),                  # the raw view goes without its name
    ("1", SnrKey("raw", (1,))),
    ("heads:0", SnrKey("heads", (0,))),
    ("q.heads:0,1,2", SnrKey("q.heads", (0, 1, 2))),
    ("k:1", SnrKey("k", (1,))),                      # a fused projection's part keeps its name
])
def test_snr_key_texts_are_the_plan_json_keys(text, key):
    assert SnrKey.parse(text) == key
    assert str(key) == text


@pytest.mark.parametrize("text, label", [
    ("raw:256x256", ViewLabel("raw", (256, 256))),
    ("heads:4x32x128", ViewLabel("heads", (4, 32, 128))),
    ("q.heads:4x8x32", ViewLabel("q.heads", (4, 8, 32))),
    ("raw:128", ViewLabel("raw", (128,))),
])
def test_view_label_texts_are_the_trajectory_view_column(text, label):
    assert ViewLabel.parse(text) == label
    assert str(label) == text


def test_shapes_and_subsets_round_trip():
    assert (parse_shape("2x32"), format_shape((2, 32))) == ((2, 32), "2x32")
    assert (parse_shape(""), format_shape(())) == ((), "")       # a 0-dim tensor
    assert (parse_subset("0,2"), format_subset((0, 2))) == ((0, 2), "0,2")


@pytest.mark.parametrize("parse, text", [
    (SnrKey.parse, "fan_in"), (SnrKey.parse, "heads:"), (SnrKey.parse, "0, 1"), (SnrKey.parse, "-1"),
    (ViewLabel.parse, "raw"), (ViewLabel.parse, ":4x4"), (ViewLabel.parse, "raw:4x"), (ViewLabel.parse, "raw:4,4"),
    (parse_subset, ""), (parse_subset, "0;1"), (parse_shape, "4x?"),
])
def test_malformed_texts_are_refused_naming_the_text(parse, text):
    with pytest.raises(ValueError, match=repr(text).replace("?", r"\?")):
        parse(text)


@pytest.mark.parametrize("column, bad", [("view", "raw"), ("subset", "fan_in"), ("shape", "4 by 4")])
def test_a_row_with_a_malformed_key_names_its_line(tmp_path, column, bad):
    row = {"step": "10", "name": "w", "shape": "4x4", "view": "raw:4x4", "subset": "0",
           "snr": "0.5", "mean_sq": "1.0", "var": "2.0"}
    good = ",".join(row.values())
    row[column] = bad
    path = tmp_path / "snr.csv"
    path.write_text("step,name,shape,view,subset,snr,mean_sq,var\n" + good + "\n" + ",".join(row.values()) + "\n")
    with pytest.raises(TrajectoryError, match=f"snr.csv: line 3: .*{bad!r}"):
        read_trajectory(path)
