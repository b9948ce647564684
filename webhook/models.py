"""Wire formats: the AdmissionReview v1 envelope, and the shape of the parts of a pod the webhook reads.

The request envelope is a pydantic model with camelCase aliases; the response is typed as TypedDicts and built as
plain dicts. The pod itself stays the plain dict it arrived as (the patch is computed against it, so fields no
model here knows are never dropped); the ``*Shape`` types only *check* that the fields the decision reads have
the types the code expects, so a body whose ``containers`` is a string is a 400 with the path of the bad field,
never a 500.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from pydantic.alias_generators import to_camel
from typing_extensions import TypedDict

ADMISSION_API_VERSION: Final = "admission.k8s.io/v1"
ADMISSION_KIND: Final = "AdmissionReview"


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


# The response is built as plain dicts (a pydantic round trip per review costs more than the decision); these
# TypedDicts are its type. Keys are the wire's camelCase; optional ones are left out rather than set to null.


class Status(TypedDict):
    code: int
    message: str
    reason: NotRequired[str]


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patch: NotRequired[str]  # base64 of a JSON patch
    patchType: NotRequired[Literal["JSONPatch"]]
    warnings: NotRequired[list[str]]
    status: NotRequired[Status]
    # Recorded in the API server's audit log as ``<webhook name>/<key>``; keys are plain names (no prefix).
    auditAnnotations: NotRequired[dict[str, str]]


class AdmissionReviewResponse(TypedDict):
    apiVersion: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    response: AdmissionResponse


# --- shapes of what the decision reads (validation only; extra fields are ignored, nulls are allowed) -----------
#
# TypedDicts, not models: validating into plain dicts skips building a model instance per env var, mount and
# toleration, about three times less work on a pod with a few hundred of them (bench/admission.py).

_SHAPE = ConfigDict(extra="ignore", strict=True)


@with_config(_SHAPE)
class _Named(TypedDict):
    name: str


@with_config(_SHAPE)
class _Mount(TypedDict):
    name: str
    mountPath: str


@with_config(_SHAPE)
class ContainerShape(TypedDict):
    name: str
    env: NotRequired[list[_Named] | None]
    volumeMounts: NotRequired[list[_Mount] | None]


@with_config(_SHAPE)
class _SecretRef(TypedDict):
    name: NotRequired[str | None]


@with_config(_SHAPE)
class _Requirement(TypedDict):
    key: str
    operator: str
    values: NotRequired[list[str] | None]


@with_config(_SHAPE)
class _Term(TypedDict):
    matchExpressions: NotRequired[list[_Requirement] | None]
    matchFields: NotRequired[list[_Requirement] | None]


@with_config(_SHAPE)
class _Selector(TypedDict):
    nodeSelectorTerms: NotRequired[list[_Term] | None]


@with_config(_SHAPE)
class _NodeAffinity(TypedDict):
    requiredDuringSchedulingIgnoredDuringExecution: NotRequired[_Selector | None]


@with_config(_SHAPE)
class _Affinity(TypedDict):
    nodeAffinity: NotRequired[_NodeAffinity | None]


@with_config(_SHAPE)
class _Toleration(TypedDict):
    key: NotRequired[str | None]
    operator: NotRequired[str | None]
    value: NotRequired[str | None]
    effect: NotRequired[str | None]


@with_config(_SHAPE)
class PodSpecShape(TypedDict):
    containers: NotRequired[list[ContainerShape] | None]
    initContainers: NotRequired[list[ContainerShape] | None]
    ephemeralContainers: NotRequired[list[_Named] | None]
    volumes: NotRequired[list[_Named] | None]
    imagePullSecrets: NotRequired[list[_SecretRef] | None]
    nodeName: NotRequired[str | None]
    nodeSelector: NotRequired[dict[str, str] | None]
    affinity: NotRequired[_Affinity | None]
    tolerations: NotRequired[list[_Toleration] | None]


@with_config(_SHAPE)
class MetadataShape(TypedDict):
    name: NotRequired[str | None]
    generateName: NotRequired[str | None]
    namespace: NotRequired[str | None]
    annotations: NotRequired[dict[str, str] | None]
    deletionTimestamp: NotRequired[str | None]


@with_config(_SHAPE)
class PodShape(TypedDict):
    """A Pod, or the pod template of a workload: the same two fields matter."""

    metadata: NotRequired[MetadataShape | None]
    spec: NotRequired[PodSpecShape | None]


#: ``POD_SHAPE.validate_python(obj)`` raises ValidationError when a field the decision reads has the wrong type.
POD_SHAPE: TypeAdapter[PodShape] = TypeAdapter(PodShape)


def shape_error(exc: ValidationError, where: str) -> str:
    """``request.object.spec.containers.0.name: Input should be a valid string`` (first few problems)."""
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
        parts.append(f"{loc}: {e['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
