"""GET /v1/methods describes every method well enough to build a form from it: the
defaults it lists for the served family are accepted back as overrides."""

from __future__ import annotations

from editors.methods import METHODS

from .service_support import running_app


def test_every_method_is_listed_with_its_defaults_and_bounds_and_its_defaults_are_accepted(
    tiny_settings,
):
    with running_app(tiny_settings()) as client:
        methods = {m["name"]: m for m in client.get("/v1/methods").json()}
        assert set(methods) == set(METHODS)
        rome = {h["name"]: h for h in methods["rome"]["hyperparameters"]}
        assert methods["rome"]["family"] == "gpt2" and methods["rome"]["needs_statistics"]
        assert rome["layer"]["maximum"] == 3  # the tiny GPT-2 has 4 blocks
        assert rome["steps"]["maximum"] == 1000 and rome["steps"]["type"] == "int"
        assert methods["grace"]["writes_weights"] is False
        assert methods["alphaedit"]["uses_history"] is True
        for name in ("rome", "memit", "ft-m"):
            form = {
                h["name"]: h["default"]
                for h in methods[name]["hyperparameters"]
                if h["default"] is not None
            }
            body = {
                "edit": {"prompt": "{} is", "subject": "Atlantis", "target_new": "blue"},
                "method": name,
                "hparams": form,
            }
            reply = client.post("/v1/edits", json=body)
            assert reply.status_code == 202, (name, reply.json())
