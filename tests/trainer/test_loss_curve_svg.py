"""final/loss-curve.svg (kubetune_trainer.evaluation.curve_svg): valid SVG, one point per step, lower loss drawn
higher, eval points where evaluated, nothing drawn for nothing."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kubetune_trainer.evaluation.curve_svg import HEIGHT, LEFT, RIGHT, WIDTH, loss_curve_svg

pytestmark = pytest.mark.unit

NS = "{http://www.w3.org/2000/svg}"


def points(svg: ET.Element, cls: str) -> list[tuple[float, float]]:
    line = next(e for e in svg.iter(f"{NS}polyline") if e.get("class") == cls)
    return [tuple(float(v) for v in p.split(",")) for p in line.get("points").split()]


def test_a_falling_loss_is_drawn_rising_left_to_right_with_eval_points():
    history = [{"step": s, "loss": 4.0 / s} for s in range(1, 21)]
    evals = [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.3}]
    svg = ET.fromstring(loss_curve_svg(history, evals))
    assert svg.tag == f"{NS}svg" and svg.get("width") == str(WIDTH)
    train = points(svg, "train")
    assert len(train) == 20
    xs, ys = [x for x, _ in train], [y for _, y in train]
    assert xs == sorted(xs) and xs[0] == pytest.approx(LEFT) and xs[-1] == pytest.approx(WIDTH - RIGHT)
    assert ys == sorted(ys)  # SVG y grows downwards: a falling loss goes up the picture
    assert all(0 <= y <= HEIGHT for y in ys)
    assert len(points(svg, "eval")) == 2
    labels = [t.text for t in svg.iter(f"{NS}text")]
    assert "train loss" in labels and "eval loss" in labels and "step" in labels


def test_non_finite_losses_are_left_out_and_nothing_gives_no_picture():
    svg = ET.fromstring(loss_curve_svg([{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")},
                                        {"step": 3, "loss": 1.0}], []))
    assert len(points(svg, "train")) == 2
    assert loss_curve_svg([], []) == ""
    single = ET.fromstring(loss_curve_svg([{"step": 5, "loss": 1.5}], []))  # one point: a dot, no line
    assert not list(single.iter(f"{NS}polyline")) and len(list(single.iter(f"{NS}circle"))) == 1
