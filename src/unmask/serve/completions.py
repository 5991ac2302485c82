"""`POST /v1/completions`: prompts (text, token ids, or a batch of either; `suffix` = infilling) through the
front end, `n` choices each, answered by serve/generation.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from unmask.serve.generation import Choice, choices_for, respond
from unmask.serve.http import JsonRoute
from unmask.serve.schema import ApiError, CompletionRequest
from unmask.serve.server import Server, server

router = APIRouter(route_class=JsonRoute)


def prompts(srv: Server, prompt: str | list) -> list[tuple[list[int], bool]]:
    """(token ids, is text) of each prompt: a text, token ids, or a list of either (OpenAI's batch form)."""
    if isinstance(prompt, str):
        return [(srv.encode(prompt, "prompt"), True)]
    if prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [pair for p in prompt for pair in prompts(srv, p)]
    ids = list(prompt)
    srv.check_ids(ids, "prompt")
    return [(ids, False)]


@router.post("/v1/completions")
async def completions(request: Request, req: CompletionRequest, srv: Server = Depends(server)) -> Response:
    srv.check_model(req.model)
    given = prompts(srv, req.prompt)
    srv.check_choices(req, len(given))
    suffix_ids = srv.encode(req.suffix, "suffix") if req.suffix else None
    if suffix_ids is not None and not srv.layout.diffusion:
        raise ApiError("suffix: infilling needs a diffusion model; this one is autoregressive", 400, "suffix")
    if not suffix_ids and any(not ids for ids, _ in given):
        raise ApiError("prompt: empty; give some text (or a suffix to infill before)", 400, "prompt")
    options = srv.decode_options(req)
    choices: list[Choice] = []
    for i, (prompt_ids, text) in enumerate(given):
        prepared = srv.prepare(req, options, prompt_ids, text, suffix_ids)
        echo = srv.tokenizer.decode(prompt_ids) if req.echo else ""
        choices += choices_for(req, i * req.n, prepared, echo)
    return await respond(srv, request, req, "/v1/completions", choices, chat=False)
