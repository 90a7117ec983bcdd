"""Handlers are checked at start-up; sources come from the environment and bridge.toml."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import ConfigError
from bridge.events import Output
from bridge.plugin import Sample, WebhookRequest
from bridge.registry import check_handler, load_handlers, load_sources
from handlers.stripe import StripeOptions, handler


def test_a_handler_that_cannot_load_is_named(tmp_path: Path) -> None:
    broken = EntryPoint(
        name="acme", value="no_such_module:handler", group="millimetric_bridge.handlers"
    )
    with pytest.raises(ConfigError, match=r"handler 'acme': cannot be loaded from no_such_mod"):
        load_handlers([broken])


def test_a_handler_missing_parts_is_named() -> None:
    class Half:
        name = "half"

    with pytest.raises(ConfigError, match=r"handler 'half'.*missing .*'scheme'"):
        check_handler("half", Half())


class OldStyle:
    """A plugin written against the protocol before `delivery_id` read the request alone
    and before `headers` existed."""

    name = "old"
    secret_variable = "OLD_WEBHOOK_SECRET"
    scheme = handler.scheme
    options_type = StripeOptions
    headers: Any = ()

    def parse(self, request: WebhookRequest) -> Any:
        return handler.parse(request)

    def delivery_id(self, request: WebhookRequest, payload: Any) -> str:
        return str(payload.id)

    def translate(self, request: WebhookRequest, payload: Any, options: Any) -> list[Output]:
        return handler.translate(request, payload, options)

    def samples(self) -> Mapping[str, Sample]:
        return handler.samples()


def test_a_delivery_id_that_wants_the_payload_is_refused_at_start_up(tmp_path: Path) -> None:
    # Refused while loading, naming the plugin, rather than a 503 on every delivery.
    (tmp_path / "old_plugin.py").write_text(
        "from tests.test_registry import OldStyle\nhandler = OldStyle()\n"
    )
    old = EntryPoint(name="old", value="old_plugin:handler", group="millimetric_bridge.handlers")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        # Recorded as absent, so that the module imported below is dropped afterwards.
        patch.setitem(sys.modules, "old_plugin", None)
        del sys.modules["old_plugin"]
        with pytest.raises(ConfigError) as refused:
            load_handlers([old])
    message = str(refused.value)
    assert message.startswith("handler 'old': delivery_id(request, payload) must take")
    assert "\n" not in message


def test_a_handler_without_headers_is_refused_naming_them() -> None:
    class NoHeaders:
        name = "old"
        secret_variable = "OLD_WEBHOOK_SECRET"
        scheme = handler.scheme
        options_type = StripeOptions
        parse = delivery_id = translate = samples = staticmethod(lambda *a: None)

    with pytest.raises(ConfigError, match=r"handler 'old'.*missing \['headers'\]"):
        check_handler("old", NoHeaders())


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        (["x-topic"], "headers must be a tuple of header names"),
        (("x-topic", 5), "headers must be a tuple of header names"),
        ("x-topic", "headers must be a tuple of header names"),
        (("X-Topic",), "'X-Topic' is not a lower-case header name"),
        (("",), "'' is not a lower-case header name"),
        (("x-topic\n",), "is not a lower-case header name"),
        (("authorization",), "'authorization' carries credentials"),
        (("cookie",), "'cookie' carries credentials"),
    ],
)
def test_headers_must_be_lower_case_names_and_never_credentials(headers: Any, says: str) -> None:
    plugin = OldStyle()
    plugin.delivery_id = lambda request: "id"  # type: ignore[assignment, method-assign]
    check_handler("old", plugin)  # the plugin is otherwise sound
    plugin.headers = headers
    with pytest.raises(ConfigError, match=r"^handler 'old': .*" + re.escape(says)):
        check_handler("old", plugin)


def test_a_handler_registered_under_another_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="must equal the entry-point name"):
        check_handler("stripe2", handler)


def test_secrets_are_a_comma_list_and_unset_means_unmounted(tmp_path: Path) -> None:
    env = {"BRIDGE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    sources = load_sources(env, {"stripe": handler})
    assert not sources["stripe"].configured
    sources = load_sources(
        {**env, "STRIPE_WEBHOOK_SECRET": " whsec_a , whsec_b ,"}, {"stripe": handler}
    )
    assert sources["stripe"].secrets == ("whsec_a", "whsec_b")


def test_bridge_toml_adds_sources_with_their_own_secrets_and_options(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        "[sources.stripe]\nforget_on_customer_deleted = true\n"
        '[sources.stripe-eu]\nhandler = "stripe"\ntolerance = 600\n'
    )
    env = {"BRIDGE_CONFIG": str(config), "STRIPE_EU_WEBHOOK_SECRET": "whsec_eu"}
    sources = load_sources(env, {"stripe": handler})
    assert sources["stripe"].options == StripeOptions(forget_on_customer_deleted=True)
    eu = sources["stripe-eu"]
    assert (eu.handler, eu.secret_variable, eu.secrets) == (
        handler,
        "STRIPE_EU_WEBHOOK_SECRET",
        ("whsec_eu",),
    )
    assert eu.options.tolerance == 600
    assert load_sources(env, {"stripe": handler}, dev=True)["stripe-eu"].options == (
        StripeOptions(tolerance=600, include_test_events=True)
    )


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ('[sources.x]\nhandler = "nope"\n', "no handler named 'nope'"),
        ('[sources.stripe]\ntolerance = "long"\n', "Expected `int`"),
        ("[sources.stripe]\nunknown_option = 1\n", "unknown field `unknown_option`"),
        ('[sources.Bad_Name]\nhandler = "stripe"\n', "lower-case"),
        ('[sources.x]\nhandler = "stripe"\nsecret_variable = "lower"\n', "secret_variable"),
        ("not toml at all [", "cannot read"),
        # The relay's deliveries are translated by its own handler: no source may be `relay`.
        ('[sources.relay]\nhandler = "stripe"\n', r"\[sources.relay\]: relay is the name"),
    ],
)
def test_bridge_toml_mistakes_name_the_table(tmp_path: Path, toml: str, says: str) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=says):
        load_sources({"BRIDGE_CONFIG": str(config)}, {"stripe": handler})


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BRIDGE_CONFIG"):
        load_sources({"BRIDGE_CONFIG": str(tmp_path / "missing.toml")}, {"stripe": handler})


@pytest.mark.parametrize("tolerance", [0, -5, 10**9])
def test_a_tolerance_that_would_disable_replay_protection_is_refused(
    tmp_path: Path, tolerance: int
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(f"[sources.stripe]\ntolerance = {tolerance}\n")
    with pytest.raises(ConfigError, match="tolerance"):
        load_sources({"BRIDGE_CONFIG": str(config)}, {"stripe": handler})


def test_handler_must_be_a_name(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[sources.x]\nhandler = ["stripe"]\n')
    with pytest.raises(ConfigError, match="handler must be"):
        load_sources({"BRIDGE_CONFIG": str(config)}, {"stripe": handler})
