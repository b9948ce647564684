"""Validate objects against the official Kubernetes OpenAPI schemas (kubernetes-validate, strict mode).

Strict mode rejects unknown fields, so a typo in a field the webhook writes (``readonly`` for ``readOnly``) or a
field that a supported Kubernetes version does not have yet fails here rather than at the API server.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

#: The Kubernetes versions the webhook supports: ImageVolumeSource exists in the schema from 1.31.
VERSIONS = ("1.31.0", "1.33.0", "1.35.0", "1.37.0")


def assert_valid_pod(obj: dict[str, Any], versions: tuple[str, ...] = VERSIONS) -> None:
    """Fail the test with the schema's message when ``obj`` is not valid for every one of ``versions``."""
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}") from None


assert_valid = assert_valid_pod  # workloads validate the same way
