"""Where a container job's image comes from: Batch AI's `imageSourceRegistry`.

`image` names the image; `serverUrl` (optional) is the registry that holds it, and an image
whose name starts with no registry host is taken from there (`team/trainer:1` on
`https://myregistry.azurecr.io` is `myregistry.azurecr.io/team/trainer:1`). `credentials`
(`username`, `password`) log the pull in to that registry, or to Docker Hub without a
`serverUrl`. The password reaches only the agent that pulls, in its StartTask, and goes to the
engine in the pull's `X-Registry-Auth` header; it is never logged. A `passwordSecretReference`
(Azure Key Vault) is refused at submission; one a log of an earlier version holds is not
resolved: such a pull goes without a password.
"""

from __future__ import annotations

from typing import Any

DOCKER_HUB = "docker.io"


def image_reference(registry: dict[str, Any]) -> str:
    """The image to pull, named with its registry where the document gives one (or where a
    login needs one: an image without a host, logged in to, is on Docker Hub)."""
    image = str(registry["image"])
    if _names_host(image):
        return image
    host = _host(registry.get("serverUrl"))
    if host is None and registry.get("credentials"):
        host = DOCKER_HUB
    return f"{host}/{image}" if host else image


def registry_auth(registry: dict[str, Any]) -> dict[str, str] | None:
    """The login for the pull (the engine's X-Registry-Auth fields), or None."""
    credentials = registry.get("credentials") or {}
    if not isinstance(credentials.get("username"), str):
        return None
    password = credentials.get("password")
    return {
        "username": credentials["username"],
        "password": password if isinstance(password, str) else "",
        "serveraddress": image_reference(registry).partition("/")[0],
    }


def _names_host(image: str) -> bool:
    """Does the image's name start with a registry host (`host.domain/`, `host:port/`,
    `localhost/`)?"""
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def _host(url: Any) -> str | None:
    """A registry's host (and port) from a `serverUrl` such as `https://r.azurecr.io/`."""
    if not isinstance(url, str) or not url.strip():
        return None
    text = url.strip()
    for scheme in ("https://", "http://"):
        text = text.removeprefix(scheme)
    return text.split("/", 1)[0] or None
