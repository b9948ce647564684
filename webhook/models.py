"""Wire formats: the AdmissionReview v1 envelope, and the shape of the parts of a pod the webhook reads.

The envelope is a pydantic model with camelCase aliases. The pod itself stays the plain dict it arrived as (the
patch is computed against a deep copy of it, so fields no model here knows are never dropped); the ``*Shape``
models only *check* that the fields the decision reads have the types the code expects, so a body whose
``containers`` is a string is a 400 with the path of the bad field, never a 500.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", strict=True)


class GroupVersionKind(_Wire):
    group: str = ""
    version: str = ""
    kind: str = Field(min_length=1)


class AdmissionRequest(_Wire):
    uid: str = Field(min_length=1)
    kind: GroupVersionKind
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    name: str | None = None
    namespace: str | None = None
    sub_resource: str | None = None
    object: dict[str, Any] | None = None
    old_object: dict[str, Any] | None = None
    dry_run: bool | None = None


class AdmissionReview(_Wire):
    api_version: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    request: AdmissionRequest


class Status(_Wire):
    code: int
    message: str
    reason: str | None = None


class AdmissionResponse(_Wire):
    uid: str
    allowed: bool
    patch: str | None = None  # base64 of a JSON patch
    patch_type: Literal["JSONPatch"] | None = None
    warnings: list[str] | None = None
    status: Status | None = None


class AdmissionReviewResponse(_Wire):
    api_version: Literal["admission.k8s.io/v1"] = ADMISSION_API_VERSION
    kind: Literal["AdmissionReview"] = ADMISSION_KIND
    response: AdmissionResponse

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# --- shapes of what the decision reads (validation only; extra fields are ignored, nulls are allowed) -----------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _Named(_Shape):
    name: str


class _Mount(_Shape):
    name: str
    mountPath: str


class ContainerShape(_Shape):
    name: str
    env: list[_Named] | None = None
    volumeMounts: list[_Mount] | None = None


class _SecretRef(_Shape):
    name: str | None = None


class _Requirement(_Shape):
    key: str
    operator: str
    values: list[str] | None = None


class _Term(_Shape):
    matchExpressions: list[_Requirement] | None = None
    matchFields: list[_Requirement] | None = None


class _Selector(_Shape):
    nodeSelectorTerms: list[_Term] | None = None


class _NodeAffinity(_Shape):
    requiredDuringSchedulingIgnoredDuringExecution: _Selector | None = None


class _Affinity(_Shape):
    nodeAffinity: _NodeAffinity | None = None


class _Toleration(_Shape):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None


class PodSpecShape(_Shape):
    containers: list[ContainerShape] | None = None
    initContainers: list[ContainerShape] | None = None
    ephemeralContainers: list[_Named] | None = None
    volumes: list[_Named] | None = None
    imagePullSecrets: list[_SecretRef] | None = None
    nodeName: str | None = None
    nodeSelector: dict[str, str] | None = None
    affinity: _Affinity | None = None
    tolerations: list[_Toleration] | None = None


class MetadataShape(_Shape):
    name: str | None = None
    generateName: str | None = None
    namespace: str | None = None
    annotations: dict[str, str] | None = None
    deletionTimestamp: str | None = None


class PodShape(_Shape):
    metadata: MetadataShape | None = None
    spec: PodSpecShape | None = None


class PodTemplateShape(_Shape):
    metadata: MetadataShape | None = None
    spec: PodSpecShape | None = None


def shape_error(exc: ValidationError, where: str) -> str:
    """``request.object.spec.containers.0.name: Input should be a valid string`` (first few problems)."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
        parts.append(f"{loc}: {e['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
