"""The gateway's plain request and answer types.

The core takes and returns these; the servicer converts the public API's
protobuf messages to them and back, and the downstream clients convert them to
and from fusion's messages (as fusion's and the encoder's servicers do for
their cores). Answers are frozen: the idempotency cache hands the same answer
object to every replay of a write. The types built on every Recommend call
(``RecommendQuery``, ``UserContext``, ``FusionRecommend``) are slotted and not
frozen: a frozen dataclass's ``__init__`` costs ~0.8 us more per object, on the
path that matters most for throughput; nothing changes them after they are built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# --- reads --------------------------------------------------------------------


@dataclass(frozen=True)
class ItemDisplay:
    """What a person needs to judge an item."""

    title: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    reason: str = ""
    # Set only when the request asked for display fields.
    display: ItemDisplay | None = None


@dataclass(frozen=True)
class Filters:
    attribute_equals: Mapping[str, str] = field(default_factory=dict)
    tags_any: Sequence[str] = ()


NO_FILTERS = Filters()


@dataclass(frozen=True)
class AnonymousUser:
    attributes: Mapping[str, str] = field(default_factory=dict)
    interest_text: str = ""
    recent_item_ids: Sequence[str] = ()


@dataclass(slots=True)
class RecommendQuery:
    """A Recommend call. Exactly one of ``user_id`` (a known user; "" is invalid)
    and ``anonymous`` says who asks."""

    k: int
    user_id: str | None = None
    anonymous: AnonymousUser | None = None
    filters: Filters = NO_FILTERS
    exclude_item_ids: Sequence[str] = ()
    include_display: bool = False


@dataclass(frozen=True)
class Recommendation:
    items: Sequence[ScoredItem]
    model_version: str
    new_user: bool = False
    # True when fusion was unreachable and the registry's fallback answered.
    degraded: bool = False


@dataclass(frozen=True)
class SimilarItems:
    items: Sequence[ScoredItem]
    model_version: str
    degraded: bool = False


@dataclass(frozen=True)
class ModelInfo:
    version: str
    created_at: str = ""
    parent_version: str = ""
    dimension: int = 0
    item_count: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    encoder_model: str = ""


# --- writes (``idempotency_key`` "" = none) ---------------------------------------


@dataclass(frozen=True)
class RegisterUser:
    user_id: str = ""  # generated when empty
    attributes: Mapping[str, str] = field(default_factory=dict)
    interest_text: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True)
class Registered:
    user_id: str
    event_id: str


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    kind: str = ""  # "view" when empty
    value: float = 0.0  # 1.0 when 0
    timestamp_ms: int = 0  # now when 0


@dataclass(frozen=True)
class RecordInteractions:
    interactions: Sequence[Interaction]
    idempotency_key: str = ""


@dataclass(frozen=True)
class Recorded:
    recorded: int
    event_ids: tuple[str, ...]


@dataclass(frozen=True)
class NewItem:
    item_id: str
    text: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()


@dataclass(frozen=True)
class UpsertItems:
    items: Sequence[NewItem]
    idempotency_key: str = ""


@dataclass(frozen=True)
class Upserted:
    upserted: int
    event_ids: tuple[str, ...]


@dataclass(frozen=True)
class ForgetUser:
    user_id: str
    idempotency_key: str = ""


@dataclass(frozen=True)
class Forgotten:
    event_id: str


# --- what the core asks fusion ---------------------------------------------------


@dataclass(slots=True)
class UserContext:
    user_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    interest_vector: Sequence[float] = ()
    recent_item_ids: Sequence[str] = ()


@dataclass(slots=True)
class FusionRecommend:
    user: UserContext
    k: int
    exclude_item_ids: Sequence[str] = ()
    filters: Filters | None = None  # None: no filter
    include_display: bool = False


@dataclass(frozen=True)
class ItemRecord:
    """An item as fusion's live index takes it: the input plus its content vector."""

    item_id: str
    text: str
    attributes: Mapping[str, str]
    tags: Sequence[str]
    content_vector: Sequence[float]
