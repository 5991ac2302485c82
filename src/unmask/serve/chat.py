"""`POST /v1/chat/completions`: messages rendered by the checkpoint's chat template, then answered like a
completion (serve/generation.py); a turn ends at the checkpoint's end-of-turn strings too."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from unmask.errors import UnmaskError
from unmask.serve.generation import choices_for, respond
from unmask.serve.http import JsonRoute
from unmask.serve.schema import ApiError, ChatCompletionRequest
from unmask.serve.server import Server, server

router = APIRouter(route_class=JsonRoute)


def chat_prompt(srv: Server, req: ChatCompletionRequest) -> str:
    """The messages rendered by the checkpoint's chat template, with the client's template variables."""
    try:
        return srv.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                                 **(req.chat_template_kwargs or {}))
    except UnmaskError as e:
        raise ApiError(f"messages: {e}", 400, "messages") from None
    except TypeError as e:  # a variable the renderer sets itself ("got multiple values for keyword ...")
        raise ApiError(f"chat_template_kwargs: {e}", 400, "chat_template_kwargs") from None


def check_messages(srv: Server, req: ChatCompletionRequest) -> None:
    if len(req.messages) > srv.limits.max_messages:
        raise ApiError(f"messages: at most {srv.limits.max_messages} messages", 400, "messages")
    chars = sum(len(m.content) for m in req.messages)
    if chars > srv.limits.max_prompt_chars:
        raise ApiError(f"messages: {chars} characters is above the limit of {srv.limits.max_prompt_chars}",
                       400, "messages")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, req: ChatCompletionRequest, srv: Server = Depends(server)) -> Response:
    srv.check_model(req.model)
    srv.check_choices(req, 1)
    check_messages(srv, req)
    prompt_ids = srv.tokenizer.encode(chat_prompt(srv, req))
    srv.check_ids(prompt_ids, "messages")
    options = srv.decode_options(req)
    # a model may close its turn with an end-of-turn token or open the next turn: both end the answer
    options = options.replace(stop=options.stop + [t for t in srv.turn_ends if t not in options.stop])
    prepared = srv.prepare(req, options, prompt_ids, True, prompt_field="messages")
    return await respond(srv, request, req, "/v1/chat/completions", choices_for(req, 0, prepared), chat=True)
