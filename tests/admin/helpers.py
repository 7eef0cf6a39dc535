"""Driving the admin app in-process with httpx: log in, read CSRF tokens, post forms."""

from __future__ import annotations

import html
import re

import httpx

__all__ = ["MASTER_KEY", "csrf_of", "form_id_of", "log_in", "post_form"]

MASTER_KEY = "master-key-for-the-admin-tests"


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token in the first form of a page."""
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return html.unescape(found.group(1))


async def log_in(client: httpx.AsyncClient, key: str = MASTER_KEY) -> httpx.Response:
    login = await client.get("login")
    return await client.post("login", data={"csrf": csrf_of(login), "master_key": key})


async def post_form(
    client: httpx.AsyncClient, page: str, action: str, data: dict[str, str]
) -> httpx.Response:
    """Open ``page``, then submit ``data`` to ``action`` with that page's CSRF token."""
    opened = await client.get(page)
    fields = {"csrf": csrf_of(opened)}
    if 'name="form_id"' in opened.text:
        fields["form_id"] = form_id_of(opened)
    return await client.post(action, data={**fields, **data})


def form_id_of(page: httpx.Response) -> str:
    """The one-time id of the key creation form."""
    found = re.search(r'name="form_id" value="([^"]+)"', page.text)
    assert found, page.text
    return html.unescape(found.group(1))
