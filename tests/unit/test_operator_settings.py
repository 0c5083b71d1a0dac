"""kopf settings of the operator: event handlers only, so no per-event essence copies."""

from __future__ import annotations

import kopf
import pytest

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune.handlers import registry
from kubetune.main import EventHandlersOnlyDiffBase, build_parser, has_change_handlers, make_settings

pytestmark = pytest.mark.unit


def test_operator_registers_event_handlers_only_and_skips_the_essence():
    assert not has_change_handlers(registry)
    settings = make_settings(build_parser().parse_args([]))
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, EventHandlersOnlyDiffBase)
    pod = kopf.Body({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                     "spec": {"containers": [{"name": "c"}]}})
    assert storage.build(body=pod) == {}


def test_a_change_handler_is_detected():
    other = kopf.OperatorRegistry()

    @kopf.on.update(API_GROUP, API_VERSION, PLURAL, registry=other)
    def on_update(**_):  # noqa: ANN202 - a kopf handler
        return None

    assert has_change_handlers(other)

