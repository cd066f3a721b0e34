"""Methods compose on the served model: a GRACE codebook entry keeps working after weight
edits below its layer (the keys are read again on the weights each edit makes). Real HTTP
through the app's lifespan, on the trained fact model; the same with every fact said, in
both orders, on SmolLM2 in test_service_real_model.py."""

from __future__ import annotations

from .service_support import running_app, wait_job

# the fact model has 4 blocks: the codebook sits in the last, the weight edits go below it;
# a memorising model needs strong weight edits (see test_fact_model.py)
HPARAMS = {
    "grace": {"layer": 3, "steps": 200, "lr": 0.5},
    "rome": {"layer": 1, "clamp_norm_factor": 4.0, "steps": 60, "lr": 2.0, "prefixes": 0},
    "ft-m": {"layers": [1], "steps": 60},
}


def _edit(client, method: str, fact: dict) -> str:
    body = {
        "edit": {k: fact[k] for k in ("prompt", "subject", "target_new")},
        "method": method,
        "hparams": HPARAMS[method],
    }
    reply = client.post("/v1/edits", json=body)
    assert reply.status_code == 202, reply.json()
    job = wait_job(client, reply.json()["job_id"])
    assert job["status"] == "applied", job
    return reply.json()["edit_ids"][0]


def _says(client, fact: dict) -> bool:
    prompt = fact["prompt"].format(fact["subject"])
    reply = client.post(
        "/v1/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 1}}
    )
    return reply.json()["generated_text"].split() == fact["target_new"].split()[:1]


def test_a_codebook_entry_keeps_working_after_weight_edits_below_it(
    tiny_settings, fact_model_folder, fact_facts
):
    grace_fact, rome_fact, ft_fact = fact_facts[:3]
    with running_app(tiny_settings(model=str(fact_model_folder))) as client:
        assert not _says(client, grace_fact)
        grace_id = _edit(client, "grace", grace_fact)
        assert _says(client, grace_fact)
        keys_at = client.get("/v1/model").json()["version"]
        _edit(client, "rome", rome_fact)
        assert _says(client, grace_fact)
        _edit(client, "ft-m", ft_fact)
        assert _says(client, grace_fact)
        assert client.get(f"/v1/edits/{grace_id}").json()["live"]
        # every version keeps its own keys: back at the codebook's own version it still fires
        job = client.post("/v1/rollback", json={"to_version": keys_at}).json()
        assert job["status"] == "applied", job
        assert _says(client, grace_fact)


def test_codebook_entries_without_contexts_refuse_a_weight_edit_naming_themselves(tiny_settings):
    """Entries recorded before contexts were kept cannot have their keys read again: a
    weight edit is refused at submit time (409 naming the edit), a codebook edit is not."""
    import torch

    from editors.codebook import Codebook
    from editors.patch import Patch
    from service.ledger.schema import VersionKind
    from service.ledger.store import NewEdit, NewVersion

    with running_app(tiny_settings()) as client:
        state = client.app.state.service
        request = {"prompt": "The capital of {} is", "subject": "Atlantis", "target_new": "Rome"}
        job, (edit_id,) = state.ledger.accept_edits([NewEdit(request, "grace", {})])
        book = Codebook(torch.randn(1, 256), torch.randn(1, 64), torch.ones(1))  # no contexts
        old = Patch("grace", {}, codebooks={"transformer.h.3.mlp.c_proj": book})
        new = NewVersion(VersionKind.edit, parent=0, checksum="", edit_ids=(edit_id,))
        state.ledger.start_job(job.id)
        state.engine.jobs.record(job.id, new, old, [edit_id])
        before = client.get("/v1/model").json()
        edit = {"prompt": "The capital of {} is", "subject": "Narnia", "target_new": "Paris"}
        refused = client.post("/v1/edits", json={"edit": edit, "method": "rome"})
        assert refused.status_code == 409, refused.json()
        assert edit_id in refused.json()["error"] and refused.json()["field"] == "method"
        assert client.get("/v1/model").json() == before  # nothing was accepted
        accepted = client.post("/v1/edits", json={"edit": edit, "method": "grace"})
        assert accepted.status_code == 202
