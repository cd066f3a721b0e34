"""/docs and /redoc load nothing from another host: their scripts, styles and icon are
served by the app itself (no lifespan needed: the pages do not touch the model)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_name_only_local_assets_and_each_is_served(page, tmp_path):
    client = TestClient(create_app(Settings(data_dir=tmp_path, auth="keys")))
    reply = client.get(page)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert "http://" not in reply.text and "https://" not in reply.text  # no CDN, no fonts
    links = _Links()
    links.feed(reply.text)
    assert len(links.urls) >= 2, reply.text  # a script and the icon at least
    for url in links.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1_000, url
    assert client.get("/openapi.json").status_code == 200
