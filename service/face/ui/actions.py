"""What an operator may do on the page: sign in with a token, sign out, and retry a
failed job (or one sink of it) as `filedock retry` does.

Every POST passes the same gate before anything else: a token file is configured
(otherwise the page is read-only and every POST is 403), the form comes from the
page's own origin, and (but for signing in) a live session and the form's CSRF token.
Each action and each refusal is logged with who (the token's name) and what.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from service.face.logs import get_logger
from service.face.ui.auth import LOGIN_COOKIE, SESSION_COOKIE, Session
from service.face.ui.views import ID_RE

if TYPE_CHECKING:
    from service.face.ui.site import OperatorPage

__all__ = ["login", "login_form", "logout", "retry"]

log = get_logger("filedock.ui")

_SINK_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_READ_ONLY: Final = "This page is read-only: no ui.token_file is configured."
_FORM_MAX_BYTES: Final = 16 << 10


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _refuse(
    page: OperatorPage, request: Request, action: str, reason: str, who: str | None = None
) -> Response:
    job_id = request.path_params.get("job_id")
    log.warning(
        "ui action refused",
        extra={
            "who": who,
            "action": action,
            "job_id": job_id,
            "reason": reason,
            "client": _client(request),
        },
    )
    return page.message(request, 403, "Refused", reason)


def _local(target: str | None) -> str:
    """Where to go after signing in: a path of this site only."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


async def read_form(request: Request) -> dict[str, str] | None:
    """A posted form (`application/x-www-form-urlencoded`, at most 16 KiB): each field's
    first value. None for any other body."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_MAX_BYTES:
            return None
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in fields.items()}


async def login_form(page: OperatorPage, request: Request) -> Response:
    if not page.gate.tokens.configured:
        return page.message(request, 403, "Read-only", _READ_ONLY)
    nonce = page.gate.login_nonce()
    response = page.render(
        request,
        "login.html",
        title="Sign in",
        nav="",
        nonce=nonce,
        next=_local(request.query_params.get("next")),
        failed=False,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=1800,
        path="/ui/login",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def login(page: OperatorPage, request: Request) -> Response:
    if not page.gate.tokens.configured:
        return _refuse(page, request, "sign-in", _READ_ONLY)
    if not page.gate.origin_ok(request.headers):
        return _refuse(page, request, "sign-in", "the form did not come from this page")
    form = await read_form(request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if (
        form is None
        or not nonce
        or not hmac.compare_digest(form.get("nonce", "").encode(), nonce.encode())
    ):
        return _refuse(page, request, "sign-in", "the sign-in form has expired: load it again")
    who = page.gate.tokens.who(form.get("token", ""))
    if who is None:
        log.warning("ui sign-in refused: no such token", extra={"client": _client(request)})
        next_page = _local(form.get("next"))
        return page.render(
            request,
            "login.html",
            403,
            title="Sign in",
            nav="",
            nonce=nonce,
            next=next_page,
            failed=True,
        )
    cookie, _ = page.gate.issue(who)
    log.info("ui sign-in", extra={"who": who, "client": _client(request)})
    response = RedirectResponse(_local(form.get("next")), 303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=int(page.gate.session_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


async def _checked(
    page: OperatorPage, request: Request, action: str
) -> tuple[Session, dict[str, str]] | Response:
    """The session and form of a POST that passed the gate, or the refusal."""
    if not page.gate.tokens.configured:
        return _refuse(page, request, action, _READ_ONLY)
    if not page.gate.origin_ok(request.headers):
        return _refuse(page, request, action, "the form did not come from this page")
    session = page.session(request)
    if session is None:
        return _refuse(page, request, action, "sign in with a token first")
    form = await read_form(request)
    if form is None or not page.gate.csrf_ok(session, form.get("csrf")):
        expired = "the form has expired: load the page again"
        return _refuse(page, request, action, expired, session.name)
    return session, form


async def logout(page: OperatorPage, request: Request) -> Response:
    checked = await _checked(page, request, "sign-out")
    if isinstance(checked, Response):
        return checked
    log.info("ui sign-out", extra={"who": checked[0].name, "client": _client(request)})
    response = RedirectResponse("/", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def retry(page: OperatorPage, request: Request) -> Response:
    """`filedock retry ID [--sink NAME]`, by the signed-in operator."""
    from service.face.retry import retry_job

    checked = await _checked(page, request, "retry")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    job_id = request.path_params["job_id"]
    sink = form.get("sink") or None
    if not ID_RE.match(job_id) or (sink is not None and not _SINK_RE.match(sink)):
        return page.message(request, 400, "Bad request", "not a job id or a sink name")
    what = {
        "who": session.name,
        "action": "retry",
        "job_id": job_id,
        "sink": sink,
        "client": _client(request),
    }
    async with page.actions_lock:
        job = await page.ledger.get(job_id)
        if job is None:
            return page.message(request, 404, "No such job", f"The ledger has no job {job_id}.")
        problem = await retry_job(page.settings, page.ledger, job, sink=sink)
    if problem:
        log.warning("ui action not done", extra={**what, "problem": problem})
        return page.message(request, 409, "Not retried", f"{job_id} {problem}")
    log.info("ui action", extra={**what, "result": "queued"})
    return RedirectResponse(f"/ui/jobs/{quote(job_id)}?notice=queued", 303)
