"""/v1/models and /v1/models/{id}: the one served model."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from ....engine.engine import Engine
from ....state import ServiceState
from ...deps import EngineDep, StateDep
from ...openai_schemas import ModelCard, ModelList
from .common import MODELS, context_length, served

router = APIRouter(prefix="/v1", tags=["openai"])


def _card(state: ServiceState, engine: Engine) -> ModelCard:
    name = state.settings.model
    return ModelCard(
        id=name, created=int(time.time()), root=name, max_model_len=context_length(engine)
    )


@router.get("/models", response_model=ModelList, dependencies=MODELS)
async def list_models(state: StateDep, engine: EngineDep, response: Response) -> ModelList:
    response.headers["X-Model-Version"] = str(engine.version)
    return ModelList(data=[_card(state, engine)])


@router.get("/models/{model_id:path}", response_model=ModelCard, dependencies=MODELS)
async def get_model(
    model_id: str, state: StateDep, engine: EngineDep, response: Response
) -> ModelCard:
    served(model_id, state)
    response.headers["X-Model-Version"] = str(engine.version)
    return _card(state, engine)
