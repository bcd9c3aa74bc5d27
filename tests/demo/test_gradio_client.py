"""The app's endpoint through `gradio_client`, against the app served locally: labels, and GMACs and gate picture
that move with the threshold while the static side stays put; the exact budget selects that many regions."""

import re
from pathlib import Path

import pytest

from hf_msvit.demo import BUDGET, THRESHOLD
from hf_msvit.models.msvit.modeling_msvit import budget_count


GMACS = re.compile(r"### ([0-9.e+-]+) GMACs for this image: [0-9.]+% of the static backbone \(([0-9.e+-]+) GMACs\)")


def shown_gmacs(summary: str) -> tuple[float, float]:
    match = GMACS.search(summary)
    assert match, summary
    return float(match.group(1)), float(match.group(2))


def test_client_labels_and_gmacs_follow_the_knob(launched_app):
    client_module = pytest.importorskip("gradio_client", reason="pip install -e '.[demo]'")
    client = client_module.Client(launched_app.url, verbose=False)
    image = client_module.handle_file(str(launched_app.examples[0]))
    config = launched_app.demo.model.config

    everything = client.predict(image, THRESHOLD, 0.0, 0.5, api_name="/analyze")
    nothing = client.predict(image, THRESHOLD, 1.0, 0.5, api_name="/analyze")
    gate_picture, static_picture, labels, static_labels, summary = nothing
    assert labels["label"] in config.id2label.values()
    assert len(labels["confidences"]) == min(5, config.num_labels)
    assert {entry["label"] for entry in static_labels["confidences"]} <= set(config.id2label.values())
    (gmacs_all, static_all), (gmacs_none, static_none) = shown_gmacs(everything[4]), shown_gmacs(summary)
    assert gmacs_none < gmacs_all and static_none == static_all
    assert Path(gate_picture).read_bytes() != Path(everything[0]).read_bytes()
    assert Path(static_picture).read_bytes() == Path(everything[1]).read_bytes()

    regions = config.coarse_grid[0] * config.coarse_grid[1]
    budgeted = client.predict(image, BUDGET, 0.5, 0.25, api_name="/analyze")
    assert f"({budget_count(0.25, regions)} of {regions} regions fine)" in budgeted[4]
    assert "fine_region_budget=0.25" in budgeted[4]
